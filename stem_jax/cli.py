"""Shared command-line plumbing for train.py / eval.py: flag parsing with helpful errors for unknown
config keys, and user errors printed as one line instead of a traceback."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from absl import flags

from stem_jax.config import Config, ConfigError, suggest_key, validate

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = str(REPO / "configs" / "tiny.py")


def die(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def load_config_file(path: str) -> Config:
    spec = importlib.util.spec_from_file_location("_stem_config", path)
    if spec is None or not Path(path).is_file():
        die(f"config file {path!r} does not exist")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _config_path(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return DEFAULT_CONFIG


def _explain_unknown_key(argv: list[str], err: Exception):
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # presets import each other as `configs.*`
    cfg = load_config_file(_config_path(argv))
    for a in argv:
        if a.startswith("--config."):
            msg = suggest_key(cfg, a[len("--config."):].split("=", 1)[0])
            if msg:
                die(msg)
    die(f"bad config override: {err}")


def define_config_flag():
    """``--config`` (a preset file) with ``--config.a.b=value`` overrides, as in the Flax examples.

    ml_collections resolves override names while defining the flag: an unknown one is reported here
    with the closest field name."""
    from ml_collections import config_flags
    try:
        return config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Preset file defining get_config().",
                                               lock_config=True)
    except KeyError as e:
        _explain_unknown_key(sys.argv, e)


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing with one-line errors; an unknown ``--config.a.b`` suggests the closest field."""
    try:
        return flags.FLAGS(argv)
    except KeyError as e:
        _explain_unknown_key(argv, e)
    except flags.Error as e:
        die(str(e))


def check_no_args(argv: list[str]) -> None:
    """Reject stray positional arguments; quiet absl/orbax INFO logs unless -v/--verbosity was given."""
    from absl import logging
    if not any(a.startswith(("-v", "--verbosity")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        die(f"unexpected positional arguments {argv[1:]}; use --flag=value")


def checked(config_holder) -> Config:
    """The validated config of a ``define_config_flag`` holder; an unreadable preset file is named."""
    try:
        return validate(config_holder.value)
    except ConfigError as e:
        die(str(e))
    except OSError as e:  # ml_collections defers a failed preset load to the first access
        die("could not load the config file: " + " ".join(str(e.__cause__ or e).split()))


def run_user_errors(fn, *args, **kwargs):
    """Run ``fn``; user-facing errors become ``error: ...`` and exit code 1 (set STEM_JAX_TRACEBACK=1
    for the full traceback)."""
    from stem_jax.data import TokenIdError
    from stem_jax.sharding import MeshError
    try:
        return fn(*args, **kwargs)
    except (ConfigError, MeshError, TokenIdError, FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        if os.environ.get("STEM_JAX_TRACEBACK"):
            raise
        die(f"{type(e).__name__}: {e}", code=1)
