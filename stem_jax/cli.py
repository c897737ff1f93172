"""Command-line plumbing shared by every entry point, all absl flags: train.py / eval.py / aot / experiments
(``--config`` presets with ``--config.a.b=value`` overrides), the workdir tools (``parse_command``: fresh
flags per call, optional sub-commands, ``--help`` listing every flag), and user errors printed as one line
instead of a traceback."""
from __future__ import annotations

import atexit
import importlib.util
import logging as pylogging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

import jax
from absl import flags, logging
from ml_collections import config_flags

from stem_jax import peers
from stem_jax.checkpoint import CheckpointError
from stem_jax.lock import WorkdirLockedError
from stem_jax.config import Config, ConfigError, suggest_key, validate
from stem_jax.corpus import default_cache_dir
from stem_jax.data import TokenIdError
from stem_jax.sharding import MeshError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = str(REPO / "configs" / "tiny.py")


def die(msg: str, code: int = 2):
    """``error: msg`` and exit. In a multi-process run the exit skips JAX's shutdown barrier, which would wait
    (up to its timeout, then abort) for peers that are blocked in a collective with this process."""
    if jax.distributed.is_initialized():
        peers.exit_now(f"error: {msg}", code)
    _COMPILES["quiet"] = True
    print(f"error: {msg}", file=sys.stderr, flush=True)
    # the error stays the last line: the interpreter's shutdown chatter after it (e.g. "coroutine was never
    # awaited" for a failed background checkpoint save, printed while modules are torn down) goes nowhere
    atexit.register(_silence_stderr)
    raise SystemExit(code)


def _silence_stderr() -> None:
    sys.stderr.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)


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
    try:
        return config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Preset file defining get_config().",
                                               lock_config=True)
    except KeyError as e:
        _explain_unknown_key(sys.argv, e)


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing with one-line errors; an unknown ``--config.a.b`` suggests the closest field. Every entry
    point that parses with it gets ``--compilation_cache`` and the persistent compilation cache."""
    define_compilation_cache_flag()
    try:
        rest = flags.FLAGS(argv)
        enable_compilation_cache(flags.FLAGS.compilation_cache)
        return rest
    except KeyError as e:
        _explain_unknown_key(argv, e)
    except flags.Error as e:
        die(str(e))


Define = Callable[[flags.FlagValues, "str | None"], None]


def parse_command(argv: Sequence[str] | None, prog: str, about: str, define: Define,
                  commands: dict[str, str] | None = None) -> tuple[str | None, flags.FlagValues]:
    """``(command, flags)`` of a tool's command line, e.g. ``export --workdir W --out D``.

    ``define(fv, command)`` declares the flags on a fresh ``FlagValues``, so a tool can be run many times in
    one process (tests). ``commands`` maps sub-command names to one-line descriptions. ``--help`` prints the
    usage and every flag; a bad command or flag exits with a one-line ``error:``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    helping = any(a in ("-h", "--help", "--helpfull") for a in argv)
    command = None
    if commands:
        listing = "; ".join(f"{name}: {text}" for name, text in commands.items())
        if not argv or argv[0] not in commands:
            if helping:
                print(f"usage: {prog} COMMAND [--flag=value ...]\n{about}\ncommands: {listing}")
                raise SystemExit(0)
            die(f"{prog}: expected a command first, one of {', '.join(commands)} (got {argv[:1] or 'none'}); "
                f"{prog} COMMAND --help lists its flags")
        command = argv.pop(0)
    fv = flags.FlagValues()
    define(fv, command)
    define_compilation_cache_flag(fv)
    name = f"{prog} {command}" if command else prog
    if helping:
        listing = [line for line in fv.get_help(include_special_flags=False).splitlines() if not line.endswith(":")]
        print(f"usage: {name} [--flag=value ...]\n{commands[command] if command else about}\n", *listing, sep="\n")
        raise SystemExit(0)
    try:
        rest = fv([name, *argv])
    except flags.Error as e:
        die(f"{name}: " + "; ".join(line.strip() for line in str(e).splitlines() if line.strip()))
    if len(rest) > 1:
        die(f"{name}: unexpected positional arguments {rest[1:]}; use --flag=value")
    if not any(a.startswith(("-v", "--verbosity")) for a in argv):
        logging.set_verbosity(logging.WARNING)  # orbax logs every save and restore at INFO
    enable_compilation_cache(fv.compilation_cache)
    return command, fv


def define_mesh_flag(fv: flags.FlagValues) -> None:
    """``--mesh`` of the workdir tools (parsed by ``sharding.parse_mesh`` when the run is restored)."""
    flags.DEFINE_string("mesh", "auto", "data,fsdp,tensor sizes of the mesh (one may be -1), or auto: the most "
                        "devices whose count divides the batch.", flag_values=fv)


def int_list(value: str, name: str) -> list[int] | None:
    """A comma-separated list of ints (None when empty), or a one-line error naming the flag."""
    try:
        return [int(x) for x in value.split(",") if x.strip()] or None
    except ValueError:
        die(f"--{name}={value!r}: expected comma-separated integers like 1,4")


def define_distributed_flags() -> None:
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with the cluster's own "
                      "settings (TPU pods, SLURM, Open MPI, ...).")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-process run "
                        "(default $JAX_COORDINATOR_ADDRESS).")
    flags.DEFINE_integer("num_processes", None, "Processes in the run (default $JAX_NUM_PROCESSES).")
    flags.DEFINE_integer("process_id", None, "This process's index (default $JAX_PROCESS_ID).")
    flags.DEFINE_integer("heartbeat_timeout", HEARTBEAT_TIMEOUT_S, "Seconds without a heartbeat after which a "
                         "process counts as dead; then every process of the run exits with a one-line error.")


HEARTBEAT_TIMEOUT_S = 30  # JAX's default is 100 s; a lost host should stop the others well within a minute


def _peer_died(what: str) -> None:
    peers.exit_now(f"\nerror: {what}; this process of the multi-process run exits too. Rerun the same command "
                   "on every process to resume from the newest checkpoint", 1)


def init_distributed() -> None:
    """``jax.distributed.initialize`` from the flags, the JAX_* environment variables, or (with
    --distributed) the cluster's auto-detection; nothing for a single-process run."""
    f = flags.FLAGS
    given = {"coordinator_address": f.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"),
             "num_processes": f.num_processes, "process_id": f.process_id}
    for name, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if given[name] is None and os.environ.get(env):
            try:
                given[name] = int(os.environ[env])
            except ValueError:
                die(f"${env}={os.environ[env]!r} is not an integer")
    if not f.distributed and all(v is None for v in given.values()):
        return
    missing = [k for k, v in given.items() if v is None]
    if missing and not f.distributed:
        die(f"a multi-process run needs --coordinator_address, --num_processes and --process_id (or "
            f"--distributed for cluster auto-detection); missing: {', '.join('--' + k for k in missing)}")
    if f.heartbeat_timeout < 1:
        die(f"--heartbeat_timeout={f.heartbeat_timeout}: give a number of seconds >= 1")
    try:
        if missing:  # cluster auto-detection decides who is process 0: JAX's heartbeats alone catch a death
            jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None},
                                       heartbeat_timeout_seconds=f.heartbeat_timeout)
        else:
            peers.initialize(jax.distributed.initialize, heartbeat_timeout=f.heartbeat_timeout,
                             on_peer_death=_peer_died, **given)
    except (ValueError, TypeError, RuntimeError) as e:
        die(f"jax.distributed.initialize failed: {e}")


CACHE_OFF = ("none", "off")


def define_compilation_cache_flag(fv: flags.FlagValues = flags.FLAGS) -> None:
    """``--compilation_cache``: where compiled XLA programs are kept between runs, or ``none``."""
    if "compilation_cache" not in fv:
        flags.DEFINE_string("compilation_cache", None, "Folder of the persistent XLA compilation cache, or none "
                            "(default: $JAX_COMPILATION_CACHE_DIR, else $STEM_JAX_CACHE/xla, else "
                            "~/.cache/stem_jax/xla).", flag_values=fv)


_COMPILES = {"programs": 0, "hits": 0, "written": 0, "seconds": 0.0, "saved": 0.0}


def _count(event: str, **_) -> None:
    key = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "written"}.get(event)
    if key:
        _COMPILES[key] += 1


def _count_seconds(event: str, seconds: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":  # a program compiled, or loaded from the cache
        _COMPILES["programs"] += 1
        _COMPILES["seconds"] += seconds
    elif event == "/jax/compilation_cache/compile_time_saved_sec":
        _COMPILES["saved"] += seconds


def compile_report() -> str:
    """One line: how many programs this process compiled and how many it loaded from the persistent cache."""
    c, where = _COMPILES, jax.config.jax_compilation_cache_dir
    if not where or not jax.config.jax_enable_compilation_cache:
        return f"compilation cache off: {c['programs']} program(s) compiled in {c['seconds']:.1f} s"
    return (f"compilation cache {where}: {c['hits']} program(s) loaded from it (saving about {max(c['saved'], 0.0):.1f} s), "
            f"{c['programs'] - c['hits']} compiled ({c['written']} written to it); {c['seconds']:.1f} s compiling "
            f"or loading")


def enable_compilation_cache(folder: str | None = None, report: bool = True) -> None:
    """Keep compiled XLA programs (those that took over a second) in a folder, so a rerun (a resume after
    preemption or kill -9, an eval, a tool) loads them instead of compiling. ``folder``: a path, or ``none``
    to turn the cache off; None: a folder already configured (``$JAX_COMPILATION_CACHE_DIR``, a test
    session's) or ``<cache>/xla`` (``$STEM_JAX_CACHE`` or ``~/.cache/stem_jax``). ``report``: print
    ``compile_report()`` when the process exits."""
    if folder is not None and folder.strip().lower() in CACHE_OFF:
        jax.config.update("jax_enable_compilation_cache", False)
    elif folder:
        jax.config.update("jax_compilation_cache_dir", str(Path(folder).expanduser()))
    elif not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "xla"))
    if not _COMPILES.get("listening"):
        _COMPILES["listening"] = True
        jax.monitoring.register_event_listener(_count)
        jax.monitoring.register_event_duration_secs_listener(_count_seconds)
        if report:
            atexit.register(_report_at_exit)


def _report_at_exit() -> None:
    """The compile report, unless nothing was compiled or the process ended with an ``error:`` line, which
    stays the last line a user sees."""
    if _COMPILES["programs"] and not _COMPILES.get("quiet"):
        print(compile_report(), file=sys.stderr, flush=True)


def check_no_args(argv: list[str]) -> None:
    """Reject stray positional arguments; quiet absl/orbax INFO logs unless -v/--verbosity was given."""
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


def _library_noise(record_path: str) -> bool:
    return any(f"{os.sep}{name}{os.sep}" in record_path for name in ("orbax", "asyncio"))


def quiet_library_noise() -> None:
    """Hide what orbax and asyncio print about failures we report ourselves in one line (a checkpoint that
    did not read, a save that failed): their log records and the "Exception ignored in <coroutine>" /
    "Event loop is closed" messages of abandoned reads. STEM_JAX_TRACEBACK=1 shows everything."""
    if os.environ.get("STEM_JAX_TRACEBACK") or getattr(sys.unraisablehook, "_stem_jax", False):
        return
    default = sys.unraisablehook

    def hook(u):
        code = getattr(u.object, "cr_code", None) or getattr(u.object, "__code__", None)
        if (code is not None and _library_noise(code.co_filename)) or "Event loop is closed" in str(u.exc_value):
            return
        default(u)
    hook._stem_jax = True
    sys.unraisablehook = hook
    absl_logger = logging.get_absl_logger()
    absl_logger.addFilter(lambda record: not _library_noise(record.pathname))
    pylogging.getLogger("asyncio").setLevel(pylogging.CRITICAL)


def run_user_errors(fn, *args, **kwargs):
    """Run ``fn``; user-facing errors become ``error: ...`` and exit code 1 (set STEM_JAX_TRACEBACK=1
    for the full traceback). Library noise about failures reported this way is hidden
    (``quiet_library_noise``)."""
    quiet_library_noise()
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - sorted below
        if os.environ.get("STEM_JAX_TRACEBACK"):
            raise
        multi = jax.distributed.is_initialized()
        if multi and any(s in str(e) for s in PEER_GONE):  # the main thread saw it before the hub said so
            _peer_died(f"a collective failed, so another process of the run died or failed "
                       f"({type(e).__name__}: {' '.join(str(e).split())[:200]})")
        if isinstance(e, USER_ERRORS):
            die(f"{type(e).__name__}: {e}", code=1)
        if not multi:
            raise
        traceback.print_exc()  # a multi-process run must not exit through the shutdown barrier (see die)
        die(f"{type(e).__name__} (traceback above)", code=1)


USER_ERRORS = (ConfigError, MeshError, TokenIdError, CheckpointError, WorkdirLockedError, FloatingPointError,
               OSError, ValueError, KeyError)
PEER_GONE = ("Gloo", "Connection reset by peer", "Socket closed")  # a collective's error when a peer is gone
