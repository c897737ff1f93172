"""Tokenize a corpus into a token store before training (``corpus.py`` describes the store).

    python -m stem_jax.data_prep --config configs/stem_350m.py --config.data.source=jsonl \\
        --config.data.files='corpus/*.jsonl.gz' --config.data.tokenizer=llama3/tokenizer.json --out /data/store
    python train.py --config configs/stem_350m.py --config.data.store=/data/store

The store depends on the ``data`` section and ``model.vocab_size`` only. Without ``--out`` it goes where
``train.py`` would build it (``data.cache_dir``), so a later ``train.py`` with the same data flags finds it.
Rerunning an interrupted command resumes it: finished units are kept.
"""
from __future__ import annotations

from pathlib import Path

from absl import app, flags

from stem_jax import cli, corpus, sources
from stem_jax.config import Config

flags.DEFINE_string("out", "", "Store folder (default: the cache folder train.py would use for this config).")
flags.DEFINE_integer("workers", None, "Tokenizer processes (default: data.workers; 0 = one per core).")
_CONFIG = cli.define_config_flag()


def prepare(cfg: Config, out: str = "", workers: int | None = None) -> Path:
    """Build (or finish) the store of ``cfg.data`` at ``out``; return its folder."""
    data = cfg.data
    if data.store:
        raise ValueError("data.store names a store to read; give the folder to write as --out")
    corpus.check_vocab(data, cfg.model.vocab_size)
    ident, units = sources.plan(data)
    if not out:
        root = Path(data.cache_dir).expanduser() if data.cache_dir else corpus.default_cache_dir()
        out = str(root / corpus.fingerprint(data, cfg.model.vocab_size, ident))
    path = corpus.build_store(data, cfg.model.vocab_size, out, workers=data.workers if workers is None else workers,
                              planned=(ident, units))
    print(f"store: {path}\ntrain with: --config.data.store={path}")
    return path


def main(argv):
    cli.check_no_args(argv)
    f = flags.FLAGS
    cli.run_user_errors(prepare, cli.checked(_CONFIG), f.out, f.workers)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
