"""Ahead-of-time TPU compile check, run on any machine (no TPU needed; needs libtpu: pip install -e ".[tpu]").

    python -m stem_jax.aot --config configs/stem_1b.py --topology v5p:4x4x2 [--config.mesh.fsdp=-1] [--batch_size N]

Compiles the real train step (``steps.train_step_fn``) for a TPU topology on abstract inputs (nothing is allocated) and prints
per-device memory, the collectives of the optimized HLO and the compile time; out of HBM exits 1 with `error:`.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

# Before jax loads: the default backend stays the CPU; we only need the TPU *compiler* (libtpu).
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _libtpu_env() -> None:
    """Off a TPU VM, libtpu logs an error and a warning for the missing VM metadata: placeholders silence them
    (the optimized HLO for v5e:2x2 and v5p:2x2x2 is byte-identical with or without). Compiling touches no
    chip, so concurrent checks (pytest -n, a benchmark) may skip libtpu's one-process /tmp/libtpu_lockfile."""
    try:
        from jax._src import hardware_utils  # private, hence the guard
        if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
            return
    except Exception:
        return
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


_libtpu_env()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.errors import JaxRuntimeError  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from stem_jax import attention, checkpoint, cli, sharding, steps  # noqa: E402

flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x2, v5p:2x2x2 (type:shape).", required=True)
flags.DEFINE_integer("batch_size", None, "Global batch in sequences (default: train.batch_size of the config).",
                     lower_bound=1)
flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")
_CONFIG = cli.define_config_flag()

GiB = 1024 ** 3
# HBM per chip, GiB, from the Cloud TPU pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e). The compiler's
# own limit, named in its out-of-memory message, differs a little: 15.75G on v5e, 95.74G on v5p.
HBM_PER_CHIP_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# "%name = TYPE opcode(": async forms count once, at "-start(" ("-done(" does not match).
_INSTR = re.compile(r"\s*(?:ROOT )?%?[\w.-]+ = (.*?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|[a-z]+(\d+))\[([\d,]*)\]")  # f32[8,64] -> bits 32, dims 8,64


def one_line(e: BaseException) -> str:  # XLA messages span lines; `error:` output is one line
    return " ".join(str(e).split())


def topology_devices(name: str) -> list:
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except RuntimeError as e:
        if isinstance(e, JaxRuntimeError):  # e.g. INVALID_ARGUMENT: topology name does not match ...
            what = "bad TPU topology" if "INVALID_ARGUMENT" in str(e) else "libtpu could not build the topology"
            cli.die(f"{what} {name!r} (use type:shape, e.g. v5e:2x2, v5p:2x2x2): {one_line(e)}")
        cli.die(f"libtpu is not installed ({one_line(e)}); install it with: pip install -e \".[tpu]\"")


def hbm_per_device(kind: str, topology: str, n_devices: int) -> int | None:
    """Chip HBM split over a chip's devices (v4 without megacore has 2); "v5e-4"-style names count 1."""
    dims = re.search(r"[:=_]((?:\d+x)+\d+)", topology)
    chips = math.prod(int(d) for d in dims.group(1).split("x")) if dims else n_devices
    return HBM_PER_CHIP_GIB[kind] * GiB // max(1, n_devices // chips) if kind in HBM_PER_CHIP_GIB else None


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """Per collective: its count, and the bytes of the largest array in its result (a table-sized all-reduce
    would show). XLA:TPU emits a reduce-scatter as an all-reduce inside an ``all-reduce-scatter`` fusion: it
    counts as a reduce-scatter, sized before the scatter."""
    out = {k: {"count": 0, "largest_bytes": 0} for k in COLLECTIVES}
    in_scatter = False
    for line in hlo.splitlines():
        if not line.startswith(" "):  # a computation's header or closing brace
            in_scatter = line.lstrip("%").startswith("all-reduce-scatter")
        elif m := _INSTR.match(line):
            kind = "reduce-scatter" if in_scatter and m.group(2) == "all-reduce" else m.group(2)
            sizes = [math.prod(int(d) for d in dims.split(",") if d) * max(1, int(bits or 8) // 8)
                     for _, bits, dims in _ARRAY.findall(m.group(1))]
            out[kind]["count"] += 1
            out[kind]["largest_bytes"] = max(out[kind]["largest_bytes"], *sizes, 0)
    return out


def check(cfg, topology: str) -> dict:
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(cfg.mesh.shape, devices=devices)
    # Abstract only: eval_shape of the model and optimizer state. Any id stands for the end-of-document token
    # of data.packing: the program's shapes and memory do not depend on which.
    ctx = steps.make_context(cfg, mesh, eos_id=0 if cfg.data.packing else None)
    state = checkpoint.restore_target(ctx.abstract_state, ctx.state_shardings)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.model.seq_len + 1), jnp.int32,
                                 sharding=ctx.batch_sharding)
    kind = devices[0].device_kind
    print(f"topology {topology}: {len(devices)} x {kind}; mesh {sharding.describe(mesh)}; "
          f"batch {cfg.train.batch_size} x {cfg.model.seq_len}; {ctx.counts.describe()}", flush=True)
    try:
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            lowered = steps.train_step_fn(ctx).lower(state, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
    except JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            cli.die(f"out of memory compiling for {topology} (mesh {sharding.describe(mesh)}, batch "
                    f"{cfg.train.batch_size}): {one_line(e)}", code=1)
        raise
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    mem = {k: getattr(m, f"{k}_size_in_bytes") for k in ("argument", "output", "temp", "alias", "generated_code")}
    mem["total"] = mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
    hbm = hbm_per_device(kind, topology, len(devices))
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    hlo = compiled.as_text()
    return {"topology": topology, "device_kind": kind, "devices": len(devices), "mesh": dict(mesh.shape),
            "batch_size": cfg.train.batch_size, "seq_len": cfg.model.seq_len, "memory_per_device": mem,
            "hbm_per_device": hbm, "collectives": collectives(hlo),
            "attention": attention.resolve(cfg.model.attention, devices[0].platform, cfg.model.seq_len,
                                           cfg.model.dtype),
            "remat": cfg.model.remat, "microbatches": cfg.train.microbatches,
            # XLA's per-device estimate; loop bodies (the microbatch scan) count once, custom kernels not at all.
            "cost_per_device": {"flops": float(cost.get("flops", -1)), "bytes": float(cost.get("bytes accessed", -1))},
            "kernel_calls": hlo.count("custom_call_target=\"tpu_custom_call\""),
            "host_memory_arrays": len(re.findall(r"\{[^{}]*S\(5\)\}", hlo)),
            "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}


def report(r: dict) -> None:
    print("memory per device (compiled.memory_analysis()):")
    for k, v in r["memory_per_device"].items():
        print(f"  {k + (' (arg+out+temp-alias)' if k == 'total' else ''):<34} {v / GiB:9.3f} GiB {v:>16,d} B")
    hbm, kind = r["hbm_per_device"], r["device_kind"]
    print(f"  HBM per device ({kind}, Cloud TPU docs) {hbm / GiB:6.2f} GiB; total uses "
          f"{r['memory_per_device']['total'] / hbm:.1%}" if hbm else f"  HBM capacity of {kind!r} unknown")
    print("collectives in optimized HLO (largest array): " + ", ".join(
        f"{k} {v['count']}" + (f" ({v['largest_bytes'] / 2**20:,.1f} MiB)" if v["count"] else "")
        for k, v in r["collectives"].items()))
    c = r["cost_per_device"]
    print(f"attention {r['attention']} ({r['kernel_calls']} kernel calls), remat {r['remat']}, microbatches "
          f"{r['microbatches']}, host-memory arrays {r['host_memory_arrays']}; XLA cost estimate per device: "
          f"{c['flops'] / 1e12:,.2f} TFLOP, {c['bytes'] / GiB:,.1f} GiB accessed")
    print(f"lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s: compiles for {r['topology']}")


def main(argv: list[str]) -> None:
    cli.check_no_args(argv)
    cfg = cli.checked(_CONFIG)
    if flags.FLAGS.batch_size is not None:
        cfg.train.batch_size = flags.FLAGS.batch_size
    r = cli.run_user_errors(check, cfg, flags.FLAGS.topology)
    report(r)
    if flags.FLAGS.json:
        Path(flags.FLAGS.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
