"""`python -m stem_jax.aot`: TPU compile checks without a TPU (needs libtpu: pip install -e ".[dev,tpu]")."""
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from stem_jax.cli import REPO

# find_spec, not import: importing libtpu sets TPU_LIBRARY_PATH for the rest of the session.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason='libtpu not installed (pip install -e ".[tpu]")')

TINY = ["--config.model.vocab_size=1024", "--config.model.d_model=64", "--config.model.n_layers=3",
        "--config.model.n_heads=4", "--config.model.n_kv_heads=2", "--config.model.d_ff=256",
        "--config.model.seq_len=64", "--config.train.batch_size=8"]
CACHE = Path(tempfile.mkdtemp(prefix="stem_jax_aot_cache_"))


def run_aot(*args: str) -> subprocess.CompletedProcess:
    # conftest's JAX_PLATFORMS=cpu does not stop the TPU topology (the module defaults to it anyway); the
    # 8-fake-CPU XLA_FLAGS are meant for the CPU backend only, so they are dropped.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TPU_LIBRARY_PATH")}
    env["STEM_JAX_CACHE"] = str(CACHE)  # nothing of a test run goes to the user's ~/.cache
    return subprocess.run([sys.executable, "-m", "stem_jax.aot", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


# v5p: the memory settings of the paper's recipe: the splash kernel (auto on TPU; seq 128), block inputs
# offloaded to host memory, two microbatches.
RECIPE = ["--config.model.seq_len=128", "--config.model.remat=offload", "--config.train.microbatches=2"]


@pytest.mark.parametrize("topology,mesh,devices", [
    ("v5e:2x2", [], "4 x TPU v5 lite; mesh data=4, fsdp=1, tensor=1"),
    ("v5p:2x2x1", ["--config.mesh.data=1", "--config.mesh.fsdp=-1", *RECIPE],
     "4 x TPU v5; mesh data=1, fsdp=4, tensor=1"),
])
def test_compiles_and_reports(tmp_path, topology, mesh, devices):
    # The train step only: the figures tpu_fit.py reads at the JSON's top level.
    r = run_aot("--topology", topology, *TINY, *mesh, "--programs=train", "--json", str(tmp_path / "fit.json"))
    assert r.returncode == 0, r.stderr
    assert devices in r.stdout
    for field in ("argument", "output", "temp", "alias", "generated_code", "total (arg+out+temp-alias)",
                  "HBM per device", "collectives in optimized HLO (largest array): all-reduce", "compile"):
        assert field in r.stdout, field
    assert "INVALID_ARGUMENT" not in r.stderr  # libtpu's missing-TPU-VM noise is silenced
    assert "compilation cache off" in r.stderr  # a TPU executable compiled here could not be loaded back
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert list(fit["programs"]) == ["train"]
    mem = fit["memory_per_device"]
    assert mem == fit["programs"]["train"]["memory_per_device"]
    assert mem["total"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"] > 0
    assert mem["alias"] > 0  # the state is donated
    # The STEM lookup's id and row exchange (the batch axes shard the table rows) is in the compiled step.
    coll = fit["collectives"]
    assert coll["all-to-all"]["count"] >= 1 and coll["all-reduce"]["count"] >= 1
    # No all-reduce as large as a STEM table's [1024, 256] fp32 gradient (the lookup's backward avoids it).
    assert coll["all-reduce"]["largest_bytes"] < 1024 * 256 * 4
    assert fit["hbm_per_device"] == (16 if topology.startswith("v5e") else 95) * 2**30
    recipe = topology.startswith("v5p")
    assert fit["attention"] == ("splash" if recipe else "xla")  # auto; seq 64 is no multiple of 128
    # 3 layers: forward, the forward recomputed under remat, and the two backward kernels (dq, dkv).
    assert fit["kernel_calls"] == (12 if recipe else 0)
    assert (fit["host_memory_arrays"] > 0) == recipe
    assert (fit["remat"], fit["microbatches"]) == (("offload", 2) if recipe else ("none", 1))


def test_dry_run_compiles_every_program(tmp_path):
    """One invocation, every program a run executes, on a small topology: each one's figures are there and
    agree with what is known about the program independently."""
    r = run_aot("--topology", "v5e:2x2", *TINY, "--json", str(tmp_path / "fit.json"))
    assert r.returncode == 0, r.stderr
    fit = json.loads((tmp_path / "fit.json").read_text())
    progs = fit["programs"]
    assert list(progs) == ["init", "train", "eval", "prefill", "decode"]
    hbm = 16 * 2**30
    for name, p in progs.items():
        assert p["status"] == "compiled", name
        mem = p["memory_per_device"]
        assert mem["total"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"] > 0, name
        assert p["hbm_fraction"] == mem["total"] / hbm, name
        assert p["cost_per_device"]["flops"] > 0, name
        assert p["all_to_all"] == p["collectives"]["all-to-all"]["count"], name
        assert p["largest_collective"]["bytes"] == max(c["largest_bytes"] for c in p["collectives"].values())
        assert f"{name:<8} args" in r.stdout, name  # its line in the printed table
    # init: no inputs, and its output is this device's share of the state (the shardings' shard shapes), plus
    # XLA:TPU's tile padding of the small arrays (norm scales, the step; 10 % of this tiny state).
    init = progs["init"]
    assert init["memory_per_device"]["argument"] == 0
    assert init["state_per_device"] == fit["state_per_device"]
    assert init["state_per_device"] <= init["memory_per_device"]["output"] < 1.2 * init["state_per_device"]
    assert init["peak_over_state"] == init["memory_per_device"]["total"] / init["state_per_device"] >= 1
    assert "x the state's" in r.stdout
    # The eval step reads the parameters (not the optimizer state) and runs the forward pass only: about a
    # third of the train step's FLOPs (forward + backward), and nothing is donated.
    train, ev = progs["train"], progs["eval"]
    assert ev["memory_per_device"]["alias"] == 0
    assert ev["memory_per_device"]["argument"] < train["memory_per_device"]["argument"] / 2
    assert 0.2 < ev["cost_per_device"]["flops"] / train["cost_per_device"]["flops"] < 0.5
    assert train["all_to_all"] >= 1 and ev["all_to_all"] >= 1  # the STEM lookup's exchange
    # The sampler: 8 prompts (the global batch) of 64 - 32 = 32 tokens, a 64-slot fp32 KV cache of 3 layers
    # [8, 64, 2 kv heads, 16] for keys and values; the prefill returns it, the decode step updates it in place.
    assert fit["sample"] == {"batch": 8, "prompt": 32, "new_tokens": 32}
    cache = 2 * 3 * 8 * 64 * 2 * 16 * 4
    prefill, decode = progs["prefill"], progs["decode"]
    assert prefill["memory_per_device"]["output"] >= cache / 4
    assert decode["memory_per_device"]["alias"] >= cache / 4
    # One new token against 32 prompt tokens: far fewer FLOPs.
    assert decode["cost_per_device"]["flops"] < prefill["cost_per_device"]["flops"] / 8


def test_programs_flag_picks_a_subset_and_refuses_unknown_names(tmp_path):
    r = run_aot("--topology", "v5e:2x2", *TINY, "--programs=decode", "--sample_batch=2", "--json",
                str(tmp_path / "fit.json"))
    assert r.returncode == 0, r.stderr
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert list(fit["programs"]) == ["decode"] and "memory_per_device" not in fit  # no train step compiled
    assert fit["sample"]["batch"] == 2
    r = run_aot("--topology", "v5e:2x2", *TINY, "--programs=eval,sample")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ConfigError: --programs='eval,sample': unknown ['sample']")


def test_out_of_memory_fails_with_one_line_after_every_program(tmp_path):
    # One fp32 STEM table of 4M x 1024 (16 GiB) plus its grad and two Adam moments, over 4 devices of 16 GiB:
    # init and the train step hold the moments too and cannot fit; the eval step reads the parameters only.
    big = [a for a in TINY if "vocab_size" not in a and "d_ff" not in a]
    r = run_aot("--topology", "v5e:2x2", *big, "--config.model.vocab_size=4194304", "--config.model.d_ff=1024",
                "--programs=init,train,eval", "--json", str(tmp_path / "fit.json"))
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("error: out of memory compiling for v5e:2x2") and "RESOURCE_EXHAUSTED" in err[-1]
    assert "init: " in err[-1] and "train: " in err[-1] and "eval: " not in err[-1]
    assert "Traceback" not in r.stderr
    progs = json.loads((tmp_path / "fit.json").read_text())["programs"]  # written before the exit
    assert [p["status"] for p in progs.values()] == ["OOM", "OOM", "compiled"]
    assert "eval     args" in r.stdout


@pytest.mark.parametrize("topology", ["v5x:2x2", "v5litepod-4"])
def test_bad_topology(topology):
    r = run_aot("--topology", topology, *TINY)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: bad TPU topology '{topology}'")
