"""The paper's recipe on TPU slices: for each preset at global batch 512 x 4096, the cheapest rematerialization
policy and microbatch count that fit, found by ahead-of-time compiles of the real train step (no TPU), and
then every other program of a run at that setting (``python -m stem_jax.aot``: init, eval, the sampler's
prefill and decode). Rerun it whenever the model, a step or the loss changes: each row names the commit it was
compiled at.

    pip install -e ".[tpu]"
    python benchmarks/tpu_fit.py --dump benchmarks/tpu_fit.json --out benchmarks/tpu_fit.md
    python benchmarks/tpu_fit.py --presets stem_350m --topologies v5p:4x4x2     # prints the table only

Each try is one ``python -m stem_jax.aot`` subprocess on the preset's mesh (data=1, fsdp=-1) and its attention
(``auto``: the splash kernel on TPU). The search walks the policies from the least recompute up (none, dots,
full, offload); within a policy it starts at one microbatch and, when the compiler reports that the step
needs X bytes of temporaries against Y of HBM, jumps to the power of two of microbatches that would bring
X under 80 % of Y, as far as the per-device batch allows. The first try that fits with at least
``--headroom`` of HBM free wins; a fit with less headroom doubles the microbatches.

A fit's row gives per-device memory and compile time, model FLOPs (``accounting``) against the program's
FLOPs, a roofline step time (max of FLOPs / peak and bytes / HBM bandwidth) and the MFU it implies. The
program's FLOPs per token come from the train step lowered for one CPU device (XLA attention, one sequence):
``Lowered.cost_analysis()`` before optimization. The compiled TPU program's own FLOP count is no use here:
its cost analysis counts a loop body once, and XLA:TPU turns FSDP matmuls into loops over the shards and the
splash kernels into custom calls it does not count. The bytes are the compiled program's estimate times the
microbatches (a lower bound, for the same reason). The roofline ignores communication and overlap: it is
an estimate, not a measurement. A second table checks the program's FLOPs against the accounting's model
FLOPs times each policy's recompute.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process only lowers for the CPU; compiles run in stem_jax.aot
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import flags  # noqa: E402

from stem_jax import accounting, checkpoint, cli, sharding, steps  # noqa: E402
from stem_jax.config import Config, ModelConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PRESETS = ("stem_350m", "dense_350m", "stem_1b", "dense_1b")
TOPOLOGIES = ("v5p:4x4x2", "v5e:4x8")  # v5e:16x16 (256 chips): a partial search in docs/performance.md
REMAT_ORDER = ("none", "dots", "full", "offload")
MESH = ("--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=1")
GiB = 1024 ** 3
# HBM bandwidth per chip, bytes/s (Cloud TPU system-architecture pages).
HBM_BANDWIDTH = {"TPU v4": 1.2e12, "TPU v5 lite": 8.19e11, "TPU v5": 2.765e12, "TPU v6 lite": 1.64e12}
_SIZE = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNIT = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def devices_of(topology: str) -> int:
    return math.prod(int(d) for d in re.search(r"[:=_]((?:\d+x)+\d+)", topology).group(1).split("x"))


OTHER_PROGRAMS = ("init", "eval", "prefill", "decode")  # compiled once, at the setting the search found


def commit() -> str:
    """``git rev-parse HEAD``, with ``+local`` when the package or the presets differ from it."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "stem_jax", "configs"], cwd=REPO).returncode
    return (head or "?") + ("+local" if dirty else "")


def run(preset: str, topology: str, remat: str, k: int, timeout: int, programs: str = "train") -> dict:
    args = [f"--config=configs/{preset}.py", f"--topology={topology}", *MESH, f"--config.model.remat={remat}",
            f"--config.train.microbatches={k}", f"--programs={programs}"]
    r = {"cmd": ["python", "-m", "stem_jax.aot", *args], "preset": preset, "topo": topology, "remat": remat,
         "microbatches": k, "commit": commit()}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fit.json"
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, "-m", "stem_jax.aot", *args, f"--json={out}"], cwd=REPO,
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**r, "status": f"compile > {timeout} s, stopped", "wall_s": timeout}
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        if p.returncode == 0:
            return {**r, **json.loads(out.read_text()), "status": "fits"}
        if out.exists():  # some programs compiled, others ran out of memory
            r = {**r, **json.loads(out.read_text())}
    err = (p.stderr.strip().splitlines() or ["?"])[-1]
    r["status"] = "OOM" if "out of memory" in err else "error"
    r["error"] = err.split("RESOURCE_EXHAUSTED:", 1)[-1].strip() if r["status"] == "OOM" else err
    return r


def headroom(r: dict) -> float:
    return 1 - r["memory_per_device"]["total"] / r["hbm_per_device"]


def next_microbatches(r: dict, k: int) -> int:
    """After an OOM at ``k``: the power of two that would bring the temporaries under 80 % of HBM (at
    least 2k), assuming they shrink with the microbatch."""
    m = _SIZE.search(r.get("error", ""))
    if not m:
        return 2 * k
    need, avail = float(m.group(1)) * _UNIT[m.group(2)], float(m.group(3)) * _UNIT[m.group(4)]
    return max(2 * k, 2 ** math.ceil(math.log2(k * need / (0.8 * avail))))


def other_programs(winner: dict, timeout: int) -> dict:
    """The run's other programs (``OTHER_PROGRAMS``) compiled at the winner's setting: name -> figures (or
    ``status`` OOM), each with the commit it was compiled at."""
    r = run(winner["preset"], winner["topo"], winner["remat"], winner["microbatches"], timeout,
            ",".join(OTHER_PROGRAMS))
    progs = r.get("programs") or {name: {"status": r["status"], "error": r.get("error", "")} for name in OTHER_PROGRAMS}
    return {name: {**p, "commit": r["commit"]} for name, p in progs.items()}


def search(preset: str, topology: str, batch: int, min_headroom: float, timeout: int, log) -> list[dict]:
    """Every try for one pair, in order; the last is the winner when it fits."""
    per_device, tries = batch // devices_of(topology), []
    for remat in REMAT_ORDER:
        k = 1
        while k <= per_device:
            tries.append(run(preset, topology, remat, k, timeout))
            log(tries[-1])
            r = tries[-1]
            if r["status"] == "fits" and headroom(r) >= min_headroom:
                return tries
            if r["status"] not in ("fits", "OOM"):
                return tries  # an error or a timeout: more microbatches will not help
            k = 2 * k if r["status"] == "fits" else next_microbatches(r, k)
    return tries


def _config(preset: str) -> Config:
    return importlib.import_module(f"configs.{preset}").get_config()


def recompute_per_token(m: ModelConfig, remat: str) -> float:
    """Forward FLOPs per token that the backward pass repeats under ``remat``: for full recompute the blocks'
    forward except each block's last matmul, W_down, whose output the backward never needs (the LM head sits
    outside the blocks); attention's batched matmuls for ``dots``."""
    blocks = (accounting.flops_per_token(m, training=False) - 2 * m.d_model * m.vocab_size
              - 2 * m.n_layers * m.d_model * m.d_ff)
    return {"none": 0.0, "dots": 2 * 2 * m.n_layers * m.seq_len * m.d_model, "full": blocks, "offload": blocks}[remat]


@functools.lru_cache(maxsize=None)
def program_flops_per_token(preset: str, remat: str) -> float:
    """FLOPs per token of the train step's program as lowered for one CPU device (one sequence, XLA attention,
    no microbatches): XLA's cost analysis of the HLO before optimization, which has no loops to undercount."""
    cfg = _config(preset)
    cfg.model = dataclasses.replace(cfg.model, remat=remat, attention="xla")
    cfg.train = dataclasses.replace(cfg.train, batch_size=1, microbatches=1)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices("cpu")[:1])
    ctx = steps.make_context(cfg, mesh)
    batch = jax.ShapeDtypeStruct((1, cfg.model.seq_len + 1), jnp.int32, sharding=ctx.batch_sharding)
    with jax.set_mesh(mesh):
        lowered = steps.train_step_fn(ctx).lower(checkpoint.restore_target(ctx.abstract_state, ctx.state_shardings),
                                                 batch)
    cost = lowered.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]) / cfg.model.seq_len


def flop_row(preset: str, remat: str) -> str:
    m = _config(preset).model
    expected = accounting.flops_per_token(m) + recompute_per_token(m, remat)
    got = program_flops_per_token(preset, remat)
    return f"| {preset} | {remat} | {got / 1e9:.3f} | {expected / 1e9:.3f} | {got / expected:.3f} |"


def estimate(r: dict) -> dict:
    """Per device and step: model FLOPs, the program's FLOPs, XLA's byte estimate, the roofline time, its MFU."""
    m = _config(r["preset"]).model
    tokens = r["batch_size"] * r["seq_len"] / r["devices"]
    model = accounting.flops_per_token(m) * tokens
    program = program_flops_per_token(r["preset"], r["remat"]) * tokens
    moved = r["cost_per_device"]["bytes"] * r["microbatches"]  # the scan's body counts once
    peak, bandwidth = accounting.peak_flops(r["device_kind"]), HBM_BANDWIDTH.get(r["device_kind"])
    step = max(program / peak, moved / bandwidth) if peak and bandwidth else float("nan")
    return {"model": model, "program": program, "bytes": moved, "step_s": step,
            "mfu": model / (step * peak) if peak else float("nan")}


def _commit(r: dict) -> str:
    c = r.get("commit", "?")
    return c[:12] + c[40:] if len(c) >= 40 else c


def row(r: dict) -> str:
    head = f"| {r['preset']} | {r['topo']} | {r['remat']} | {r['microbatches']} |"
    if r["status"] != "fits":
        return (f"{head} no: {r['status']} | {r.get('error', '')} | ({r['wall_s']:.0f} wall) | | | | | | "
                f"{_commit(r)} |")
    m, e = r["memory_per_device"], estimate(r)
    return (f"{head} **yes** | {m['total'] / GiB:.2f} of {r['hbm_per_device'] / GiB:.0f} GiB ({headroom(r):.0%} "
            f"free) | {r['compile_s']:.0f} | {r['attention']} | {e['model'] / 1e12:.0f} / {e['program'] / 1e12:.0f} | "
            f"{e['bytes'] / 2 ** 40:.2f} | {e['step_s']:.2f} | {e['mfu']:.0%} | {_commit(r)} |")


def program_rows(r: dict, min_headroom: float) -> list[str]:
    """One row per program of a fitting setting: the train step (from the search) and ``r["other"]``."""
    hbm, out = r["hbm_per_device"], []
    progs = {**({"train": {**r["programs"]["train"], "commit": r.get("commit", "?")}}
                if "train" in r.get("programs", {}) else {}), **r.get("other", {})}
    for name in ("init", "train", *OTHER_PROGRAMS[1:]):
        p = progs.get(name)
        head = f"| {r['preset']} | {r['topo']} | {r['remat']} / {r['microbatches']} | {name} |"
        if p is None:
            out.append(f"{head} not compiled | | | | | | | | |")
        elif p["status"] != "compiled":
            out.append(f"{head} no: {p['status']} | {p.get('error', '')[:200]} | | | | | | | {_commit(p)} |")
        else:
            m, big = p["memory_per_device"], p["largest_collective"]
            free = 1 - m["total"] / hbm
            ratio = f"; {p['peak_over_state']:.2f} x state" if "peak_over_state" in p else ""
            out.append(f"{head} {'**yes**' if free >= min_headroom else 'no: < headroom'} | "
                       f"{m['argument'] / GiB:.2f} | {m['temp'] / GiB:.2f} | {m['total'] / GiB:.2f} ({free:.0%} free"
                       f"{ratio}) | {p['cost_per_device']['flops'] / 1e12:.1f} | "
                       f"{big['kind'] or '-'} {big['bytes'] / 2 ** 20:,.0f} MiB | {p['all_to_all']} | "
                       f"{p['compile_s']:.0f} | {_commit(p)} |")
    return out


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _define(fv: flags.FlagValues, _command) -> None:
    flags.DEFINE_string("presets", ",".join(PRESETS), "Comma-separated presets (configs/NAME.py).", flag_values=fv)
    flags.DEFINE_string("topologies", ",".join(TOPOLOGIES), "Comma-separated TPU topologies.", flag_values=fv)
    flags.DEFINE_float("headroom", 0.15, "Fraction of HBM a fit must leave free.", flag_values=fv)
    flags.DEFINE_bool("programs", True, "Also compile the run's other programs at each fitting setting.",
                      flag_values=fv)
    flags.DEFINE_integer("timeout", 1500, "Seconds per compile before it counts as too slow.", flag_values=fv)
    flags.DEFINE_string("dump", "", "Also write the raw results as JSON here.", flag_values=fv)
    flags.DEFINE_string("from_dump", "", "Render the table from --dump files (comma-separated); compile nothing.",
                        flag_values=fv)
    flags.DEFINE_string("out", "", "Write the markdown to this file (default: print it only).", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    given = list(sys.argv[1:] if argv is None else argv)
    _, args = cli.parse_command(given, "python benchmarks/tpu_fit.py", __doc__.splitlines()[0], _define)
    results = [r for f in args.from_dump.split(",") if f for r in json.loads(Path(f).read_text())]
    for preset in [] if args.from_dump else args.presets.split(","):
        for topo in args.topologies.split(","):
            tries = search(preset, topo, 512, args.headroom, args.timeout, lambda r: print(row(r), flush=True))
            if args.programs and tries[-1]["status"] == "fits":
                tries[-1]["other"] = other_programs(tries[-1], args.timeout)
                print("\n".join(program_rows(tries[-1], args.headroom)), flush=True)
            results += tries
            if args.dump:
                Path(args.dump).write_text(json.dumps(results, indent=1))
    versions = ", ".join(f"{p} {_version(p)}" for p in ("jax", "jaxlib", "libtpu"))
    text = "\n".join([
        "# The paper's recipe (global batch 512 x 4096) on TPU slices: ahead-of-time compiles, no TPU",
        "",
        f"Written by `python {' '.join(['benchmarks/tpu_fit.py', *given])}` on a CPU-only machine "
        f"({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; {versions}). Each row "
        "is one `python -m stem_jax.aot` compile of the real train step on the preset's mesh (data 1, fsdp = all "
        "devices), in search order; the last row of a pair that fits is its setting (see the module docstring). "
        "Rerun it whenever the model, a step or the loss changes; every row names the commit it was compiled at "
        "(`+local`: the package or the presets differed from that commit).",
        "",
        "Columns: per-device memory = argument + output + temp - alias; model / program TFLOP per device per step "
        "(program: see the second table); bytes = the compiled program's HBM-traffic estimate x microbatches; "
        "roofline = max(program FLOPs / peak, bytes / HBM bandwidth), an **estimate** that ignores communication "
        "and overlap; est. MFU = model FLOPs / (roofline x peak).",
        "",
        "| preset | topology | remat | microbatches | fits | per-device memory, or the compiler's message | compile s "
        "| attention | model / program TFLOP per device | bytes TiB (lower bound) | roofline step s | est. MFU "
        "| commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *map(row, results),
        "",
        "## Every program of a run at the setting found",
        "",
        "Per device, from `python -m stem_jax.aot --programs=...` at the last fitting row of each pair: the sharded "
        "init (its peak against the device's share of parameters and optimizer state), the train step, the "
        "validation/eval step (`train.microbatches`, `train.eval_loss_chunk`), and the sampler's prefill (prompts "
        "of the global batch, `seq_len - 32` tokens) and one decode step (a `seq_len`-slot KV cache). fits = at "
        f"least {args.headroom:.0%} of HBM free. TFLOP: XLA's estimate for the compiled program (a loop body "
        "counts once).",
        "",
        "| preset | topology | remat / microbatches | program | fits | arguments GiB | temp GiB | total GiB "
        "| TFLOP | largest collective | all-to-alls | compile s | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(line for r in results if r["status"] == "fits" and r.get("other")
          for line in program_rows(r, args.headroom)),
        "",
        "## The program's FLOPs against the accounting",
        "",
        "Train-step FLOPs per token of the program lowered for one CPU device (one sequence of the preset's "
        "length, XLA attention: full L x L scores, as the accounting counts them) against the accounting's model "
        "FLOPs plus the forward FLOPs the policy recomputes (`recompute_per_token`).",
        "",
        "| preset | remat | program GFLOPs / token | accounting x recompute | ratio |",
        "|---|---|---|---|---|",
        *(flop_row(p, remat) for p in dict.fromkeys(r["preset"] for r in results) for remat in REMAT_ORDER[:3]),
        "",
    ])
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
