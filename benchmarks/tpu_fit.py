"""Which presets fit which small TPU slices? Ahead-of-time compiles of the real train step, no TPU needed.

    pip install -e ".[tpu]"
    python benchmarks/tpu_fit.py --out benchmarks/tpu_fit.md       # all pairs; rewrites the table there
    python benchmarks/tpu_fit.py --presets stem_350m --topologies v5e:2x2   # prints the table only

Each (preset, topology) pair runs ``python -m stem_jax.aot`` in a subprocess, first as the preset is (mesh
data=1, fsdp=-1; batch 512 x 4096 tokens). If that runs out of HBM it tries one sequence per device, and then
(``--short_seq``) one sequence of 1024 tokens per device, which tells whether the parameters and optimizer
state fit at all. The compiler's message gives the memory it needed when a try does not fit.
``--data_mesh`` repeats the last try of each pair on the mesh data=-1 (backbone replicated, tables still
vocab-sharded over every device). A compile that takes longer than ``--timeout`` is recorded as such.
The markdown is printed unless ``--out`` is given; rewriting an existing ``--out`` file keeps its notes.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from absl import flags

from stem_jax import cli

REPO = Path(__file__).resolve().parent.parent
PRESETS = ("stem_350m", "dense_350m", "stem_1b", "dense_1b")
TOPOLOGIES = ("v5e:2x2", "v5e:2x4", "v5p:2x2x1", "v5p:2x2x2")
FSDP = ("--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=1")
DATA = ("--config.mesh.data=-1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1")
GiB = 1024 ** 3
NOTES = "<!-- Notes below this line are kept when the table is regenerated. -->"


def devices_of(topology: str) -> int:
    n = 1
    for d in re.search(r"[:=_]((?:\d+x)+\d+)", topology).group(1).split("x"):
        n *= int(d)
    return n  # chips; v5e and v5p (megacore) have one device per chip


def run(preset: str, topology: str, args: tuple[str, ...], timeout: int) -> dict:
    cmd = ["python", "-m", "stem_jax.aot", f"--config=configs/{preset}.py", f"--topology={topology}", *args]
    r = {"cmd": cmd, "preset": preset, "topo": topology}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fit.json"
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, *cmd[1:], f"--json={out}"], cwd=REPO, capture_output=True,
                               text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**r, "status": f"compile > {timeout} s, stopped", "wall_s": timeout}
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        if p.returncode == 0:
            return {**r, **json.loads(out.read_text()), "status": "fits"}
    err = (p.stderr.strip().splitlines() or ["?"])[-1]
    r["status"] = "OOM" if "out of memory" in err else "error"
    r["error"] = err.split("RESOURCE_EXHAUSTED:", 1)[-1].strip() if r["status"] == "OOM" else err
    return r


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def row(r: dict) -> str:
    flag = {a.split("=")[0].split(".")[-1].lstrip("-"): a.split("=")[1] for a in r["cmd"] if "=" in a}
    mesh = f"{flag['data']}, {flag['fsdp']}, {flag['tensor']}"
    batch = f"{flag.get('batch_size', '512')} x {flag.get('seq_len', '4096')}"
    head = f"| {r['preset']} | {r['topo']} | {mesh} | {batch} |"
    if r["status"] != "fits":
        return f"{head} no: {r['status']} | {r.get('error', '')} | ({r['wall_s']:.0f} wall) | – |"
    m = r["memory_per_device"]
    coll = ", ".join(f"{k} {v['count']} ({v['largest_bytes'] / 2**20:,.0f} MiB)"
                     for k, v in r["collectives"].items() if v["count"])
    return (f"{head} **yes** | {m['total']:,} ({m['total'] / GiB:.2f} GiB) of {r['hbm_per_device'] / GiB:.0f} GiB "
            f"| {r['compile_s']:.0f} | {coll} |")


def _define(fv: flags.FlagValues, _command) -> None:
    flags.DEFINE_string("presets", ",".join(PRESETS), "Comma-separated presets (configs/NAME.py).", flag_values=fv)
    flags.DEFINE_string("topologies", ",".join(TOPOLOGIES), "Comma-separated TPU topologies.", flag_values=fv)
    flags.DEFINE_integer("timeout", 330, "Seconds per compile before it counts as too slow.", flag_values=fv)
    flags.DEFINE_bool("short_seq", False, "If one 4096-token sequence per device does not fit, also try 1024 "
                      "tokens.", flag_values=fv)
    flags.DEFINE_bool("data_mesh", False, "Repeat the last try of each pair on mesh data=-1.", flag_values=fv)
    flags.DEFINE_string("dump", "", "Also write the raw results as JSON here.", flag_values=fv)
    flags.DEFINE_string("from_dump", "", "Rewrite the table from a --dump file; compile nothing.", flag_values=fv)
    flags.DEFINE_string("out", "", "Write the markdown table to this file, keeping the notes of an existing one "
                        "(default: print it only).", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    given = list(sys.argv[1:] if argv is None else argv)
    _, args = cli.parse_command(given, "python benchmarks/tpu_fit.py", __doc__.splitlines()[0], _define)

    results = json.loads(Path(args.from_dump).read_text()) if args.from_dump else []
    for preset in [] if args.from_dump else args.presets.split(","):
        for topo in args.topologies.split(","):
            one_per_device = (f"--batch_size={devices_of(topo)}",)
            # As the preset is; then one sequence per device; then (--short_seq) 1024-token sequences.
            short = (*one_per_device, "--config.model.seq_len=1024")
            tries = ((), one_per_device, short) if args.short_seq else ((), one_per_device)
            for extra in tries:
                results.append(run(preset, topo, (*FSDP, *extra), args.timeout))
                print(row(results[-1]), flush=True)
                if results[-1]["status"] != "OOM":
                    break
            if args.data_mesh:
                results.append(run(preset, topo, (*DATA, *extra), args.timeout))
                print(row(results[-1]), flush=True)

    if args.dump:
        Path(args.dump).write_text(json.dumps(results, indent=1))
    out = Path(args.out) if args.out else None
    notes = out.read_text().split(NOTES, 1)[1] if out and out.exists() and NOTES in out.read_text() else "\n"
    versions = ", ".join(f"{p} {_version(p)}" for p in ("jax", "jaxlib", "libtpu"))
    text = "\n".join([
        "# Do the presets fit small TPU slices? (ahead-of-time compile, no TPU)",
        "",
        f"Written by `python {' '.join(['benchmarks/tpu_fit.py', *given])}` on a CPU-only machine "
        f"({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; {versions}). Each row "
        "is one `python -m stem_jax.aot` run: the real train step (`steps.train_step_fn`) lowered and compiled for "
        "the topology on abstract inputs. Mesh is (data, fsdp, tensor); the presets use (1, -1, 1).",
        "",
        "| preset | topology | mesh | global batch x seq | fits | per-device total = arg + out + temp - alias, "
        "bytes (GiB), of HBM; or the compiler's message | compile s | collectives in optimized HLO: count "
        "(largest array) |",
        "|---|---|---|---|---|---|---|---|",
        *map(row, results),
        "",
        "Commands (each also takes `--json PATH`):",
        "",
        "```bash",
        *(" ".join(r["cmd"]) for r in results),
        "```",
        "",
        NOTES + notes,
    ])
    if out:
        out.write_text(text)
        print(f"wrote {out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
