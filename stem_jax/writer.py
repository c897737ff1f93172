"""What a run tells its user: lines on stdout (``log``, ``describe_run``), metrics in
``<workdir>/metrics.jsonl`` (one object per logged step) and TensorBoard event files. Only process 0 writes."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
from jax.sharding import Mesh
from tensorboardX import SummaryWriter  # TensorBoard event files without TensorFlow

from stem_jax import sharding
from stem_jax.accounting import ParamCounts
from stem_jax.config import Config, stem_indices


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def describe_run(cfg: Config, mesh: Mesh, counts: ParamCounts, corpus=None) -> None:
    """Devices, mesh, STEM layers and table layout, parameter counts and the corpus, one line each."""
    m = cfg.model
    log(f"devices: {jax.device_count()} x {jax.devices()[0].platform} in {jax.process_count()} process(es); "
        f"mesh {sharding.describe(mesh)}")
    layers = stem_indices(m)
    if not layers:
        log("dense model (no STEM layers)")
    else:
        kind = "STEM" if m.ffn == "stem" else m.ffn
        log(f"{kind} layers ({m.stem_layers!r} of {m.n_layers}): {list(layers)}"
            + ("" if m.ffn == "hash_moe" else f"; lookup={m.stem_lookup}"
               + (f" (capacity {m.stem_capacity})" if m.stem_lookup == "exchange" else "")))
        rows = sharding.padded_rows(m.vocab_size, mesh=mesh)
        if rows != m.vocab_size and m.ffn != "hash_moe":
            log(f"STEM tables padded from {m.vocab_size} to {rows} rows (multiple of "
                f"{sharding.ROW_PAD_MULTIPLE} and of {sharding.axis_size('stem_vocab', mesh)} vocab shards); "
                "padding rows are never addressed")
        if m.stem_offload:
            log("STEM tables and their row-wise AdamW state in host memory (pinned_host); each step moves only "
                "the batch's unique rows, staged right after the previous step is dispatched")
        elif cfg.train.stem_optimizer == "sparse":
            log("STEM tables: row-wise AdamW over each batch's unique rows (train.stem_optimizer=sparse)")
    log(counts.describe())
    if corpus is not None:
        log(f"corpus {corpus.meta['source']}: {corpus.meta['train']['tokens']:,} train / "
            f"{corpus.meta['val']['tokens']:,} val tokens, tokenizer vocab {corpus.vocab_size} ({corpus.path})")


class MetricsWriter:
    """``start_step`` > 0 resumes a run: rows logged after that step (by a run that died before its next
    checkpoint) are dropped, since the resumed run logs those steps again with the same values."""

    def __init__(self, workdir: str | Path, start_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            self._truncate(start_step)
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
