"""Ahead-of-time TPU dry run of a whole training run, on any machine (no TPU needed; needs libtpu:
pip install -e ".[tpu]").

    python -m stem_jax.aot --config configs/stem_1b.py --topology v5p:4x4x2 [--batch_size N] [--programs train,eval]

Compiles, for a TPU topology and on abstract inputs (nothing is allocated), every program a run executes:
``init`` (the sharded init, ``steps.init_fn``), ``train`` (``steps.train_step_fn``), ``eval`` (validation and
eval.py: ``steps.eval_step_fn`` in ``train.microbatches`` with ``train.eval_loss_chunk``), and the sampler's
``prefill`` and ``decode`` (``sampling._prefill`` / ``_decode_one``: ``--sample_batch`` prompts of
``seq_len - --sample_new_tokens`` tokens, one token against a ``seq_len``-slot KV cache). Per program it prints
the per-device memory (arguments, temp, total, share of HBM), XLA's FLOP estimate, the largest collective and
the number of all-to-alls, and for ``init`` its peak against the device's share of the state. The train step's
figures keep their top-level ``--json`` keys; every program's are under ``programs``. A program out of HBM
is reported and the others still compile; the run then exits 1 with one ``error:`` line.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
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
from flax import nnx  # noqa: E402
from jax.errors import JaxRuntimeError  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from stem_jax import attention, checkpoint, cli, sampling, scanning, sharding, steps  # noqa: E402
from stem_jax.config import DTYPES, ConfigError  # noqa: E402

PROGRAMS = ("init", "train", "eval", "prefill", "decode")

flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x2, v5p:2x2x2 (type:shape).", required=True)
flags.DEFINE_integer("batch_size", None, "Global batch in sequences (default: train.batch_size of the config).",
                     lower_bound=1)
flags.DEFINE_string("programs", ",".join(PROGRAMS), f"Comma-separated programs to compile, of {', '.join(PROGRAMS)}.")
flags.DEFINE_integer("sample_batch", None, "Prompts per sampler call (default: the global batch).", lower_bound=1)
flags.DEFINE_integer("sample_new_tokens", 32, "Tokens the sampler generates: the prompt fills the rest of "
                     "model.seq_len.", lower_bound=1)
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


def parse_programs(value: str) -> tuple[str, ...]:
    names = [p.strip() for p in value.split(",") if p.strip()]
    bad = [p for p in names if p not in PROGRAMS]
    if bad or not names:
        raise ConfigError(f"--programs={value!r}: unknown {bad or 'empty list'}; choose from {', '.join(PROGRAMS)}")
    return tuple(p for p in PROGRAMS if p in names)  # run order: init first, as a run does


def device_bytes(tree, shardings) -> int:
    """Bytes of ``tree``'s arrays that one device holds in device memory (the largest shard of each)."""
    total = 0
    for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        if getattr(s, "memory_kind", None) == sharding.HOST:
            continue
        total += math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
    return total


def _sample_shapes(cfg, batch: int, new_tokens: int) -> tuple[int, int]:
    """Prompt length ``P`` (a multiple of the sampler's bucket) that leaves room for ``new_tokens``."""
    P = (cfg.model.seq_len - new_tokens) // sampling.PROMPT_BUCKET * sampling.PROMPT_BUCKET
    if P < 1:
        raise ConfigError(f"--sample_new_tokens={new_tokens} leaves no prompt of model.seq_len={cfg.model.seq_len}")
    return P, new_tokens


class Skipped(Exception):
    """A program that cannot be compiled because one it depends on did not compile."""


def lowerings(ctx: steps.StepContext, programs: tuple[str, ...], sample_batch: int, new_tokens: int,
              compiled: dict) -> dict:
    """Per program, a thunk that lowers it on abstract inputs (under the mesh); ``compiled`` holds the
    programs compiled so far (decode takes its KV cache's shardings from the compiled prefill)."""
    cfg, mesh = ctx.cfg, ctx.mesh
    state = checkpoint.restore_target(ctx.abstract_state, ctx.state_shardings)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.model.seq_len + 1), jnp.int32,
                                 sharding=ctx.batch_sharding)
    params = state["params"]
    P, N = _sample_shapes(cfg, sample_batch, new_tokens)
    # Prompts sharded like a train batch where the batch shards divide them, else replicated (a few prompts).
    n_batch = sharding.axis_size("batch", mesh)
    rows = sharding.named(mesh, ("batch", "length")) if sample_batch % n_batch == 0 else sharding.replicated(mesh)
    ids_BxP = jax.ShapeDtypeStruct((sample_batch, P), jnp.int32, sharding=rows)
    valid_BxP = jax.ShapeDtypeStruct((sample_batch, P), jnp.bool_, sharding=rows)
    cache_dtype = DTYPES[cfg.model.dtype]  # the Sampler's KV cache is in the model's compute dtype

    # The sampler runs in the tools' per-layer layout (workdir.restore converts a scanned run).
    tool = steps.make_context(scanning.with_scan_layers(cfg, False), mesh) \
        if scanning.is_scanned(ctx.abstract_state["params"]) else ctx
    tool_params = checkpoint.restore_target(tool.abstract_state, tool.state_shardings)["params"]

    def prefill(p, ids, valid):
        return sampling._prefill(nnx.merge(tool.graphdef, p), ids, valid, N, cache_dtype)
    prefill_fn = jax.jit(prefill)

    def decode():
        # The cache as the prefill leaves it: its shapes and the shardings XLA gave it there.
        if "prefill" not in compiled:
            try:
                compiled["prefill"] = prefill_fn.lower(tool_params, ids_BxP, valid_BxP).compile()
            except JaxRuntimeError as e:
                raise Skipped(f"needs the prefill's cache shardings, and the prefill did not compile: {one_line(e)}")
        out = compiled["prefill"].output_shardings
        shapes = jax.eval_shape(prefill, tool_params, ids_BxP, valid_BxP)
        cache, _, pad_B = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, out)
        tok_B = jax.ShapeDtypeStruct((sample_batch,), jnp.int32, sharding=pad_B.sharding)
        one = lambda p, c, t, i, pad: sampling._decode_one(nnx.merge(tool.graphdef, p), c, t, i, P, pad)
        return jax.jit(one, donate_argnums=1).lower(tool_params, cache, tok_B, jax.ShapeDtypeStruct((), jnp.int32), pad_B)

    thunks = {
        "init": lambda: steps.init_fn(ctx).lower(),
        "train": lambda: steps.train_step_fn(ctx).lower(state, batch),
        "eval": lambda: steps.eval_step_fn(ctx.graphdef, ctx.state_shardings["params"], ctx.batch_sharding,
                                           eos_id=ctx.eos_id, microbatches=cfg.train.microbatches,
                                           chunk=cfg.train.eval_loss_chunk).lower(params, batch),
        "prefill": lambda: prefill_fn.lower(tool_params, ids_BxP, valid_BxP),
        "decode": decode,
    }
    return {p: thunks[p] for p in programs}


def compile_one(lower, mesh, hbm: int | None) -> tuple[dict, object]:
    """Lower and compile one program: its figures and the compiled program, or ``status`` OOM (or skipped)
    with the compiler's message and None."""
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            lowered = lower()
            t1 = time.perf_counter()
            compiled = lowered.compile()
    except Skipped as e:
        return {"status": "skipped", "error": str(e), "wall_s": round(time.perf_counter() - t0, 2)}, None
    except JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            return {"status": "OOM", "error": one_line(e), "wall_s": round(time.perf_counter() - t0, 2)}, None
        raise
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    mem = {k: getattr(m, f"{k}_size_in_bytes") for k in ("argument", "output", "temp", "alias", "generated_code")}
    mem["total"] = mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    hlo = compiled.as_text()
    coll = collectives(hlo)
    kind, largest = max(((k, v["largest_bytes"]) for k, v in coll.items()), key=lambda kv: kv[1])
    return {"status": "compiled", "memory_per_device": mem, "hbm_fraction": mem["total"] / hbm if hbm else None,
            # XLA's per-device estimate; loop bodies (the microbatch scan) count once, custom kernels not at all.
            "cost_per_device": {"flops": float(cost.get("flops", -1)), "bytes": float(cost.get("bytes accessed", -1))},
            "collectives": coll, "largest_collective": {"kind": kind if largest else None, "bytes": largest},
            "all_to_all": coll["all-to-all"]["count"],
            "kernel_calls": hlo.count("custom_call_target=\"tpu_custom_call\""),
            "host_memory_arrays": len(re.findall(r"\{[^{}]*S\(5\)\}", hlo)),
            "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}, compiled


def check(cfg, topology: str, programs: tuple[str, ...] = ("train",), sample_batch: int | None = None,
          sample_new_tokens: int = 32, log=functools.partial(print, file=sys.stderr)) -> dict:
    """Compile ``programs`` of ``cfg`` for ``topology``; ``log`` gets the header and a line per program as it
    compiles."""
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(cfg.mesh.shape, devices=devices)
    # Abstract only: eval_shape of the model and optimizer state. Any id stands for the end-of-document token
    # of data.packing: the program's shapes and memory do not depend on which.
    ctx = steps.make_context(cfg, mesh, eos_id=0 if cfg.data.packing else None)
    if cfg.model.stem_offload and {"train", "eval"} & set(programs):
        raise ConfigError("model.stem_offload runs the train and eval steps through offload.Offloader, which this "
                          "dry run does not compile; use --programs=init,prefill,decode")
    kind = devices[0].device_kind
    hbm = hbm_per_device(kind, topology, len(devices))
    sample_batch = sample_batch or cfg.train.batch_size
    print(f"topology {topology}: {len(devices)} x {kind}; mesh {sharding.describe(mesh)}; "
        f"batch {cfg.train.batch_size} x {cfg.model.seq_len}; {ctx.counts.describe()}; programs "
        f"{', '.join(programs)}" + (f" (sampler: {sample_batch} prompts)" if {"prefill", "decode"} & set(programs)
                                   else ""), flush=True)
    state_bytes = device_bytes(ctx.abstract_state, ctx.state_shardings)
    out, compiled = {}, {}
    for name, lower in lowerings(ctx, programs, sample_batch, sample_new_tokens, compiled).items():
        out[name], program = compile_one(lower, mesh, hbm)
        if program is not None:
            compiled[name] = program
        r = out[name]
        if name == "init" and r["status"] == "compiled":
            r["state_per_device"] = state_bytes
            r["peak_over_state"] = r["memory_per_device"]["total"] / state_bytes
        log("compiled " + summary_line(name, r), flush=True)
    result = {"topology": topology, "device_kind": kind, "devices": len(devices), "mesh": dict(mesh.shape),
              "batch_size": cfg.train.batch_size, "seq_len": cfg.model.seq_len, "hbm_per_device": hbm,
              "attention": attention.resolve(cfg.model.attention, devices[0].platform, cfg.model.seq_len,
                                             cfg.model.dtype),
              "remat": cfg.model.remat, "microbatches": cfg.train.microbatches, "loss_chunk": cfg.train.loss_chunk,
              "eval_loss_chunk": cfg.train.eval_loss_chunk, "state_per_device": state_bytes,
              "sample": {"batch": sample_batch, "prompt": _sample_shapes(cfg, sample_batch, sample_new_tokens)[0],
                         "new_tokens": sample_new_tokens},
              "programs": out}
    train = out.get("train", {})
    if train.get("status") == "compiled":  # the train step's figures at the top level, as before
        result.update({k: train[k] for k in ("memory_per_device", "collectives", "cost_per_device", "kernel_calls",
                                             "host_memory_arrays", "lower_s", "compile_s")})
    return result


def _bytes(b: int) -> str:
    return f"{b / GiB:8.2f} GiB" if b >= GiB // 10 else f"{b / 2 ** 20:8.2f} MiB"


def summary_line(name: str, r: dict) -> str:
    if r["status"] != "compiled":
        return f"{name:<8} {r['status']}: {r['error'][:300]}"
    m, big = r["memory_per_device"], r["largest_collective"]
    frac = f"{r['hbm_fraction']:6.1%}" if r["hbm_fraction"] is not None else "     ?"
    extra = (f"; peak {r['peak_over_state']:.2f} x the state's {_bytes(r['state_per_device']).strip()} per device"
             if "peak_over_state" in r else "")
    return (f"{name:<8} args {_bytes(m['argument'])}  temp {_bytes(m['temp'])}  total {_bytes(m['total'])} {frac} "
            f"of HBM  {r['cost_per_device']['flops'] / 1e9:12,.1f} GFLOP  largest collective {big['kind'] or '-'} "
            f"{big['bytes'] / 2 ** 20:,.1f} MiB  all-to-alls {r['all_to_all']}  compile {r['compile_s']:.1f} s{extra}")


def report(r: dict) -> None:
    """The train step in detail (as before), then one line per program."""
    if "memory_per_device" in r:
        print("train step memory per device (compiled.memory_analysis()):")
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
    print(f"programs for {r['topology']} (per device; FLOPs: XLA's estimate, a loop body counted once):")
    for name, p in r["programs"].items():
        print("  " + summary_line(name, p))


def main(argv: list[str]) -> None:
    cli.check_no_args(argv)
    # No persistent cache here: a program compiled for a TPU topology without a TPU cannot be loaded back from it
    # (PjRt needs a TPU client to deserialize it), so a second run would fail on its own cache entry.
    cli.enable_compilation_cache("none")
    cfg = cli.checked(_CONFIG)
    f = flags.FLAGS
    if f.batch_size is not None:
        cfg.train.batch_size = f.batch_size
    programs = cli.run_user_errors(parse_programs, f.programs)
    r = cli.run_user_errors(check, cfg, f.topology, programs, f.sample_batch, f.sample_new_tokens)
    report(r)
    if f.json:
        Path(f.json).write_text(json.dumps(r, indent=1))
    failed = [(n, p) for n, p in r["programs"].items() if p["status"] != "compiled"]
    if failed:
        mesh = ", ".join(f"{k}={v}" for k, v in r["mesh"].items())
        cli.die(f"out of memory compiling for {r['topology']} (mesh {mesh}, batch {cfg.train.batch_size}): "
                + "; ".join(f"{n}: {p['error']}" for n, p in failed), code=1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
