"""Tokenize a corpus into a token store before training (``corpus.py`` builds it, ``store.py`` reads it).

    python -m stem_jax.data_prep --config configs/stem_350m.py --config.data.source=jsonl \\
        --config.data.files='corpus/*.jsonl.gz' --config.data.tokenizer=llama3/tokenizer.json --out /data/store
    python train.py --config configs/stem_350m.py --config.data.store=/data/store
    python -m stem_jax.data_prep --verify --out /data/store     # check every shard's sha256
    python -m stem_jax.data_prep --repair --out /data/store     # rebuild only the damaged units

The store depends on the ``data`` section and ``model.vocab_size`` only. Without ``--out`` it goes where
``train.py`` would build it (``data.cache_dir``), so a later ``train.py`` with the same data flags finds it.
Rerunning the command resumes an interrupted or failed build: the finished units whose sha256 checks out and
whose input did not change are kept, the others are (re)built. A second ``data_prep`` on the same ``--out``
while one runs is refused.
"""
from __future__ import annotations

from pathlib import Path

from absl import app, flags

from stem_jax import cli, corpus, sources, store
from stem_jax.config import Config

flags.DEFINE_string("out", "", "Store folder (default: the cache folder train.py would use for this config).")
flags.DEFINE_integer("workers", None, "Tokenizer processes (default: data.workers; 0 = one per core).")
flags.DEFINE_bool("verify", False, "Check the sha256 of every shard of the store at --out; exit 1 if any is damaged.")
flags.DEFINE_bool("repair", False, "Rebuild the damaged units of the store at --out from the inputs and data "
                  "config it was built with (the other flags are not used).")
_CONFIG = cli.define_config_flag()


def prepare(cfg: Config, out: str = "", workers: int | None = None) -> Path:
    """Build (or finish, or repair) the store of ``cfg.data`` at ``out``; return its folder. Another data_prep
    building ``out`` is an error, not a wait."""
    data = cfg.data
    if data.store:
        raise ValueError("data.store names a store to read; give the folder to write as --out")
    corpus.check_vocab(data, cfg.model.vocab_size)
    ident, units = sources.plan(data)
    if not out:
        root = Path(data.cache_dir).expanduser() if data.cache_dir else corpus.default_cache_dir()
        out = str(root / corpus.fingerprint(data, cfg.model.vocab_size, ident))
    path = corpus.build_store(data, cfg.model.vocab_size, out, workers=data.workers if workers is None else workers,
                              planned=(ident, units), wait=False, check=True)
    print(f"store: {path}\ntrain with: --config.data.store={path}")
    return path


def verify(out: str) -> list[str]:
    """Check every shard's sha256; a damaged store is a StoreDamagedError listing its damaged shards."""
    if not out:
        raise ValueError("--verify needs --out STORE, the store folder to check")
    root = Path(out).expanduser()
    damaged = store.verify(root)
    if damaged:
        names = ", ".join(Path(d).name for d in damaged[:8]) + (", ..." if len(damaged) > 8 else "")
        raise store.StoreDamagedError(f"the token store {root} has {len(damaged)} damaged shard(s): {names}; repair "
                                      f"it with `{corpus.REPAIR} {root}` (rebuilds only the damaged units)")
    print(f"the token store {root} is intact")
    return damaged


def repair(out: str, workers: int | None = None) -> Path:
    if not out:
        raise ValueError("--repair needs --out STORE, the store folder to repair")
    path = corpus.repair_store(out, workers=workers or 0)
    print(f"store: {path}")
    return path


def main(argv):
    cli.check_no_args(argv)
    f = flags.FLAGS
    if f.verify and f.repair:
        cli.die("--verify and --repair: give one (--repair checks every shard too)")
    if f.verify:
        cli.run_user_errors(verify, f.out)
    elif f.repair:
        cli.run_user_errors(repair, f.out, f.workers)
    else:
        cli.run_user_errors(prepare, cli.checked(_CONFIG), f.out, f.workers)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
