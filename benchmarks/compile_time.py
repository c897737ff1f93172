"""Compile time of the train step, scanned layers against the per-layer program (``model.scan_layers``).

For each preset and topology, ``python -m stem_jax.aot --programs train`` runs once per layout, one compile at a
time, per-layer then scanned back to back (``--rounds`` alternates the order), on the preset's mesh at the
paper's batch. Each row: lower + compile seconds of both, their ratio, and per-chip memory of both.

    python benchmarks/compile_time.py --presets stem_350m,stem_1b --topology v5p:4x4x2 --out /tmp/compile_time.md
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags

REPO = Path(__file__).resolve().parent.parent
GiB = 1024 ** 3

flags.DEFINE_string("presets", "stem_350m,stem_1b", "Comma-separated presets (configs/NAME.py).")
flags.DEFINE_string("topology", "v5p:4x4x2", "TPU topology.")
flags.DEFINE_integer("batch_size", 512, "Global batch in sequences.")
flags.DEFINE_integer("rounds", 1, "Rounds per preset; odd rounds compile per-layer first, even ones scanned first.")
flags.DEFINE_string("out", "", "Also write the markdown table here.")


def compile_once(preset: str, topology: str, batch: int, scan: bool) -> dict:
    """Figures of one ``stem_jax.aot`` run of the train step (a fresh process: nothing cached)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "aot.json"
        cmd = [sys.executable, "-m", "stem_jax.aot", f"--config=configs/{preset}.py", f"--topology={topology}",
               f"--batch_size={batch}", "--programs=train", f"--json={out}",
               f"--config.model.scan_layers={str(scan).lower()}"]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if not out.is_file():
            raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr[-2000:]}")
        p = json.loads(out.read_text())["programs"]["train"]
    if p["status"] != "compiled":
        return {"status": p["status"], "seconds": p.get("wall_s"), "memory": None}
    return {"status": "compiled", "seconds": p["lower_s"] + p["compile_s"], "lower": p["lower_s"],
            "compile": p["compile_s"], "memory": p["memory_per_device"]["total"] / GiB}


def main(argv: list[str]) -> None:
    f = flags.FLAGS
    rows = ["| preset | round | per-layer: lower + compile | scanned: lower + compile | scanned / per-layer | "
            "memory per chip (per-layer / scanned) |", "|---|---|---|---|---|---|"]
    for preset in f.presets.split(","):
        for rnd in range(1, f.rounds + 1):
            order = (False, True) if rnd % 2 else (True, False)
            got = {scan: compile_once(preset, f.topology, f.batch_size, scan) for scan in order}
            a, b = got[False], got[True]
            fmt = lambda r: (f"{r['lower']:.1f} + {r['compile']:.1f} = {r['seconds']:.1f} s"  # noqa: E731
                             if r["status"] == "compiled" else r["status"])
            mem = lambda r: "-" if r["memory"] is None else f"{r['memory']:.2f}"  # noqa: E731
            ratio = f"{b['seconds'] / a['seconds']:.2f}" if a["status"] == b["status"] == "compiled" else "-"
            rows.append(f"| {preset} | {rnd} | {fmt(a)} | {fmt(b)} | {ratio} | {mem(a)} / {mem(b)} GiB |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if f.out:
        Path(f.out).write_text(table + "\n")


if __name__ == "__main__":
    app.run(main)
