"""Ahead-of-time TPU compile check, run on any machine (no TPU needed; needs libtpu: pip install -e ".[tpu]").

    python -m stem_jax.aot --config configs/stem_1b.py --topology v5p:2x2x2 [--config.mesh.fsdp=-1] [--batch_size N]

Lowers and compiles the real ``Setup.train_step`` for a TPU topology on abstract inputs (nothing is allocated),
then prints the per-device memory of the compiled program, the collectives in its optimized HLO and the
compile time. Exits non-zero, with a one-line ``error:``, when the compiler runs out of HBM.
"""
from __future__ import annotations

import json
import math
import os
import re
import time

# Before jax loads: the default backend stays the CPU; we only need the TPU *compiler* (libtpu).
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _quiet_libtpu() -> None:
    """Without a TPU VM, libtpu logs an INVALID_ARGUMENT error and a warning for the missing VM metadata.
    Placeholders silence both; they do not change the compile (the topology is explicit: the optimized HLO
    for v5e:2x2 and v5p:2x2x2 is byte-identical with and without them). Left alone when a TPU is attached."""
    try:
        from jax._src import hardware_utils  # private, hence the guard
        if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
            return
    except Exception:
        return
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")


_quiet_libtpu()
from absl import app, flags  # noqa: E402

from stem_jax import cli  # noqa: E402

flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x2, v5p:2x2x2 (type:shape).", required=True)
flags.DEFINE_integer("batch_size", None, "Global batch in sequences (default: train.batch_size of the config).",
                     lower_bound=1)
flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")
_CONFIG = cli.define_config_flag()

GiB = 1024 ** 3
# HBM per chip, GiB, from the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e,
# /v5p, /v6e). The compiler itself allows a little less (e.g. 15.75G of a v5e's 16 GiB).
HBM_PER_CHIP_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# An HLO instruction's opcode is followed by "(" (async forms: "-start(" counted once, "-done(" not).
_OPCODE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def topology_devices(name: str) -> list:
    from jax.experimental import topologies
    from jax.errors import JaxRuntimeError
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except RuntimeError as e:
        if isinstance(e, JaxRuntimeError):  # e.g. INVALID_ARGUMENT: topology name does not match ...
            cli.die(f"bad TPU topology {name!r} (use type:shape, e.g. v5e:2x2, v5p:2x2x2): {one_line(e)}")
        cli.die(f"libtpu is not installed ({one_line(e)}); install it with: pip install -e \".[tpu]\"")


def hbm_per_device(kind: str, topology: str, n_devices: int) -> int | None:
    """Chip HBM split over a chip's devices (v4 without megacore has 2); "v5e-4"-style names count 1."""
    dims = re.search(r"[:=_]((?:\d+x)+\d+)", topology)
    chips = math.prod(int(d) for d in dims.group(1).split("x")) if dims else n_devices
    return HBM_PER_CHIP_GIB[kind] * GiB // max(1, n_devices // chips) if kind in HBM_PER_CHIP_GIB else None


def collective_counts(hlo: str) -> dict[str, int]:
    counts = dict.fromkeys(COLLECTIVES, 0)
    for m in _OPCODE.finditer(hlo):
        counts[m.group(1)] += 1
    return counts


def check(cfg, topology: str) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.errors import JaxRuntimeError
    from stem_jax import checkpoint, sharding
    from stem_jax.trainer import Setup

    devices = topology_devices(topology)
    mesh = sharding.make_mesh(cfg.mesh.shape, devices=devices)
    setup = Setup(cfg, mesh)  # abstract only: eval_shape of the model and optimizer state
    state = checkpoint.restore_target(setup.abstract_state, setup.state_shardings)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.model.seq_len + 1), jnp.int32,
                                 sharding=setup.batch_sharding)
    kind = devices[0].device_kind
    print(f"topology {topology}: {len(devices)} x {kind}; mesh {sharding.describe(mesh)}; "
          f"batch {cfg.train.batch_size} x {cfg.model.seq_len}; {setup.counts.describe()}", flush=True)
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            lowered = setup.train_step.lower(state, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
    except JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            cli.die(f"out of memory compiling for {topology} (mesh {sharding.describe(mesh)}, batch "
                    f"{cfg.train.batch_size}): {one_line(e)}", code=1)
        raise
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    mem = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
           "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes,
           "generated_code": m.generated_code_size_in_bytes}
    mem["total"] = mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
    hbm = hbm_per_device(kind, topology, len(devices))
    return {"topology": topology, "device_kind": kind, "devices": len(devices), "mesh": dict(mesh.shape),
            "batch_size": cfg.train.batch_size, "seq_len": cfg.model.seq_len, "memory_per_device": mem,
            "hbm_per_device": hbm, "collectives": collective_counts(compiled.as_text()),
            "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}


def report(r: dict) -> None:
    print("memory per device (compiled.memory_analysis()):")
    for k, v in r["memory_per_device"].items():
        print(f"  {k + (' (arg+out+temp-alias)' if k == 'total' else ''):<34} {v / GiB:9.3f} GiB {v:>16,d} B")
    hbm = r["hbm_per_device"]
    if hbm:
        used = r["memory_per_device"]["total"] / hbm
        print(f"  HBM per device ({r['device_kind']}, Cloud TPU docs) {hbm / GiB:6.2f} GiB; total uses {used:.1%}")
    else:
        print(f"  HBM capacity of {r['device_kind']!r} unknown")
    print("collectives in optimized HLO: " + ", ".join(f"{k} {v}" for k, v in r["collectives"].items()))
    print(f"lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s: compiles for {r['topology']}")


def main(argv: list[str]) -> None:
    cli.check_no_args(argv)
    cfg = cli.checked(_CONFIG)
    if flags.FLAGS.batch_size is not None:
        cfg.train.batch_size = flags.FLAGS.batch_size
    r = cli.run_user_errors(check, cfg, flags.FLAGS.topology)
    report(r)
    if flags.FLAGS.json:
        with open(flags.FLAGS.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
