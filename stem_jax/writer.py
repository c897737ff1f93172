"""Metrics to ``<workdir>/metrics.jsonl`` (one object per logged step) and TensorBoard event files.
Only process 0 writes."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax


class MetricsWriter:
    """``start_step`` > 0 resumes a run: rows logged after that step (by a run that died before its next
    checkpoint) are dropped, since the resumed run logs those steps again with the same values."""

    def __init__(self, workdir: str | Path, start_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            self._truncate(start_step)
            from tensorboardX import SummaryWriter  # TensorBoard event files without TensorFlow
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=start_step + 1)

    def _truncate(self, start_step: int) -> None:
        if not self.path.exists():
            return
        rows = self.path.read_text().splitlines(keepends=True)
        kept = [r for r in rows if r.strip() and json.loads(r)["step"] <= start_step]
        if len(kept) != len(rows):
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(r) for r in self.path.read_text().splitlines() if r.strip()]

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps({k: (v if math.isfinite(v) else str(v)) for k, v in row.items()}) + "\n")
        for k, v in row.items():
            if k != "step":
                self._tb.add_scalar(k, v, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
