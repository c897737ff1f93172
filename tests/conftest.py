"""8 fake CPU devices for every test, set before JAX initialises its backends."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from stem_jax import sharding  # noqa: E402

# Tests build many Setups whose jitted functions are identical programs; the persistent cache compiles
# each program once per session instead of once per Setup.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="stem_jax_xla_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def mesh_of(shape):
    """A mesh over the first prod(shape) devices (shape has no -1)."""
    n = 1
    for s in shape:
        n *= s
    return sharding.make_mesh(shape, devices=jax.devices()[:n])


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One tokenizer / token cache per test session, shared with CLI subprocesses."""
    return str(tmp_path_factory.mktemp("stem_cache"))


@pytest.fixture(scope="session")
def stem_workdir(tmp_path_factory, cache_dir):
    """A tiny STEM workdir (STEM at layer 1 of 2) shared read-only by the editing and knowledge tests."""
    from test_evaluate import make_workdir
    return make_workdir(tmp_path_factory.mktemp("stem_work"), cache_dir)[0]


EDIT_WORDS = "The capital of Spain is Madrid . Germany Berlin France Paris Zorvania Quelmar Tiberon Ostravel".split()


@pytest.fixture(scope="session")
def tiny_editor():
    """(Editor, Setup, params): an untrained tiny STEM model (layers 1, 2) with a tokenizer of EDIT_WORDS, for
    checks of edits against copies of the parameters."""
    import numpy as np
    from stem_jax import corpus as corpus_lib
    from stem_jax.editor import Editor
    from stem_jax.sampling import Sampler
    from stem_jax.trainer import Trainer
    rng = np.random.default_rng(0)
    tok = corpus_lib.train_tokenizer([" ".join(rng.choice(EDIT_WORDS, 20000))], 600)
    cfg = tiny_config(seq_len=32, stem_layers="1,2")
    s = Trainer.create(cfg, mesh_of((1, 1, 1)))
    params = s.init_state()["params"]
    return Editor(Sampler(s.ctx.graphdef, params, tok, s.ctx.mesh, cfg.model.seq_len), (1, 2)), s, params


def tiny_config(**model_overrides):
    """A model small enough to compile in a few seconds; vocab 1000 needs padding to 1024 table rows."""
    from stem_jax.config import Config, ModelConfig, TrainConfig
    model = dict(vocab_size=1000, d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=96, seq_len=16,
                 ffn="stem", stem_layers="full")
    model.update(model_overrides)
    return Config(model=ModelConfig(**model), train=TrainConfig(steps=10, batch_size=8, lr=1e-2, warmup_steps=2))


REPO = Path(__file__).resolve().parent.parent


def script_env(cache_dir, devices=1, **extra):
    """Environment of a CLI subprocess: the session's corpus cache (which also holds the persistent
    compilation cache, so repeated runs of one shape compile once) and ``devices`` CPU devices."""
    env = dict(os.environ, STEM_JAX_CACHE=cache_dir, JAX_PLATFORMS="cpu", **extra)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def start_script(script, *args, cache_dir, cwd=REPO, devices=1, **extra):
    return subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd,
                            env=script_env(cache_dir, devices, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_script(script, *args, cache_dir, cwd=REPO, devices=1, timeout=500, **extra):
    """Run ``script`` to completion; returns a CompletedProcess-like object (returncode, stdout, stderr)."""
    p = start_script(script, *args, cache_dir=cache_dir, cwd=cwd, devices=devices, **extra)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)
