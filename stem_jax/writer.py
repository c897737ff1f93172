"""Metrics to ``<workdir>/metrics.jsonl`` (one object per logged step) and TensorBoard event files.
Only process 0 writes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import jax


class MetricsWriter:
    def __init__(self, workdir: str | Path):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # TensorBoard event files without TensorFlow
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

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
