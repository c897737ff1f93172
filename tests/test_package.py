"""Importing stem_jax keeps JAX off libtpu where no TPU is attached (stem_jax/__init__.py)."""
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import REPO

LIBTPU_NOISE = "TPU_WORKER_HOSTNAMES"


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the tpu extra (libtpu)")
def test_no_libtpu_noise_without_a_tpu():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    code = "import stem_jax, jax; print(jax.default_backend(), jax.device_count())"
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0] == "cpu"
    assert LIBTPU_NOISE not in p.stderr, p.stderr[-2000:]
