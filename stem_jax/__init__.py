"""STEM (Scaling Transformers with Embedding Modules) in JAX / Flax NNX.

Importing the package keeps JAX off libtpu where no TPU is attached (see ``_skip_absent_tpu``)."""
import glob
import importlib.util
import os
import sys
from pathlib import Path

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips show up as PCI devices of this vendor (as jax's own probe checks)


def _tpu_attached() -> bool:
    return any(Path(v).read_text().strip() == _GOOGLE_PCI_VENDOR for v in glob.glob("/sys/bus/pci/devices/*/vendor"))


def _skip_absent_tpu() -> None:
    """With libtpu installed (the ``tpu`` extra, for AOT compile checks) JAX initialises a TPU backend on every
    start, and off a TPU VM libtpu logs a multi-line ``INVALID_ARGUMENT ... TPU_WORKER_HOSTNAMES`` error before
    falling back. When no TPU chip is attached and the user has not chosen platforms, choose them without
    ``tpu``. TPU *compiles* (``stem_jax.aot``) load libtpu directly and are unaffected."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None or _tpu_attached():
        return
    gpu = (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")) and any(
        importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))
    platforms = "cuda,cpu" if gpu else "cpu"
    os.environ["JAX_PLATFORMS"] = platforms
    if "jax" in sys.modules:  # imported before us: its config already read the environment
        try:
            sys.modules["jax"].config.update("jax_platforms", platforms)
        except Exception:  # noqa: BLE001 - backends already initialised: the message has been logged anyway
            pass


_skip_absent_tpu()
