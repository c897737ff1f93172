"""Issue 28's table of data faults, reproduced through the command lines as a user runs them.

    python benchmarks/data_faults.py [--out docs/data_faults.md] [--cases zst,gz,...] [--keep]

Every case runs ``python -m stem_jax.data_prep``, ``python train.py``, ``python -m stem_jax.sampling`` or
``python -m stem_jax.editing`` in a temporary folder (tiny model, ``JAX_PLATFORMS=cpu``, ``STEM_JAX_CACHE``
inside the folder) and records the exit code, the one-line outcome (the last line of stderr, or the log line
that matters), whether a traceback or a fatal signal appeared, and a check that nothing already written was
lost or silently changed (the input files, the store's other shards, the checkpoint the message names, the
user's workdir), computed here from the files themselves. It writes a markdown table (row | command | exit |
outcome | traceback? | data kept?) and the total time.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zstandard
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
WORDS = "stem table row token gate down the of a shard layer vocab".split()
VOCAB = 512
TINY = ["--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.n_heads=2",
        "--config.model.n_kv_heads=1", "--config.model.d_ff=64", "--config.model.seq_len=16",
        "--config.model.stem_layers=1", "--config.train.batch_size=4", "--config.train.log_every=1",
        "--config.train.warmup_steps=2", "--config.train.eval_batches=2", f"--config.model.vocab_size={VOCAB}"]
# Flags every command of a kind carries; the table leaves them out (listed once under it).
COMMON = set(TINY) | {f"--config.model.vocab_size={VOCAB}"}
LOST = re.compile(r"CHANGED|REWRITTEN|MISSING|FAILED|DIFFERENT|INCOMPLETE|WRITTEN|CREATED")
FATAL = re.compile(r"Fatal Python error|Segmentation fault|Bus error|core dumped")


class Ctx:
    """The temporary folder, the environment of every command, and the rows recorded so far."""

    def __init__(self, root: Path):
        self.root = root
        self.rows: list[dict] = []
        self.tok = root / "tok.json"
        self.env = dict(os.environ, JAX_PLATFORMS="cpu", STEM_JAX_CACHE=str(root / "cache"),
                        XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1")
        self.env.pop("PYTHONWARNINGS", None)
        COMMON.update({f"--config.data.tokenizer={self.tok}", "--config.data.source=jsonl", "--workers=2"})

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, **kw)

    def run(self, cmd: list[str], timeout: float = 300, **kw) -> "Result":
        t = time.time()
        p = self.popen(cmd, **kw)
        out, err = p.communicate(timeout=timeout)
        return Result(cmd, p.returncode, out, err, time.time() - t)

    def record(self, row: str, r: "Result", outcome: str | None, kept: str, killed: bool = False) -> None:
        """One table row; ``killed``: this script sent the signal that ended the process (not a crash)."""
        text = r.out + r.err
        outcome = (outcome if outcome is not None else r.last_err()).replace(str(self.root) + "/", "")
        self.rows.append(dict(row=row, command=self.short(r.cmd), exit=r.code, outcome=outcome,
                              traceback=("Traceback" in text) or bool(FATAL.search(text))
                              or (not killed and (r.code < 0 or r.code > 128)),
                              kept=kept.replace(str(self.root) + "/", ""), seconds=r.seconds))
        tb = " TRACEBACK" if self.rows[-1]["traceback"] else ""
        print(f"[{row}] exit {r.code}{tb} ({r.seconds:.1f} s): {self.rows[-1]['outcome'][:200]}\n    kept: {kept}",
              flush=True)

    def short(self, cmd: list[str]) -> str:
        parts = []
        for a in cmd:
            if a == PY or a == "-m" or a in COMMON:
                continue
            a = a.replace(str(self.root) + "/", "").replace("--config.", "").replace("stem_jax.", "")
            parts.append(a)
        return " ".join(parts)


class Result:
    def __init__(self, cmd, code, out, err, seconds):
        self.cmd, self.code, self.out, self.err, self.seconds = cmd, code, out, err, seconds

    def last_err(self) -> str:
        lines = [x for x in self.err.strip().splitlines() if x.strip()]
        return lines[-1] if lines else ""

    def line(self, pattern: str) -> str:
        """The first line of stdout or stderr matching ``pattern`` ('' if none)."""
        for x in (self.out + "\n" + self.err).splitlines():
            if re.search(pattern, x):
                return x.strip()
        return ""


# ----------------------------------------------------------------------------------------------- inputs

def docs(n: int, seed: int, words_per_doc: tuple[int, int] = (5, 60)) -> list[str]:
    rng = np.random.default_rng(seed)
    return [json.dumps({"text": " ".join(rng.choice(WORDS, rng.integers(*words_per_doc)))}) + "\n" for _ in range(n)]


def write_jsonl(path: Path, n: int, seed: int = 0, **kw) -> Path:
    path.write_text("".join(docs(n, seed, **kw)))
    return path


def make_tokenizer(path: Path) -> None:
    texts = [json.loads(x)["text"] for x in docs(300, 99)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.save(str(path))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(folder: Path, pattern: str = "*") -> dict[str, tuple]:
    """Every file under ``folder``: (inode, mtime_ns, sha256); a rewrite changes the first two."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns, sha(p))
            for p in sorted(folder.rglob(pattern)) if p.is_file()}


def unit_files(store: Path) -> dict[str, tuple]:
    return {k: v for k, v in files(store / "shards").items() if re.fullmatch(r"[0-9a-f]{16}\.(train\.bin|val\.bin|json)", k)}


def workdir_files(work: Path) -> dict[str, tuple]:
    """A workdir's files but its ``.lock``, which names the last process that held the workdir (no data)."""
    return {k: v for k, v in files(work).items() if k != ".lock"}


def changed(before: dict, after: dict) -> str:
    """'unchanged', or which files changed, appeared or went."""
    diff = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return "unchanged" if not diff else "CHANGED: " + ", ".join(
        f"{k} ({'new' if k not in before else 'gone' if k not in after else 'rewritten'})" for k in diff[:6])


def store_meta(store: Path) -> dict:
    return json.loads((store / "store.json").read_text())


def prep(c: Ctx, files_arg: str, out: Path, *extra: str, workers: int = 2) -> list[str]:
    return [PY, "-m", "stem_jax.data_prep", "--config.data.source=jsonl", f"--config.data.files={files_arg}",
            f"--config.data.tokenizer={c.tok}", f"--config.model.vocab_size={VOCAB}", *extra, f"--out={out}",
            f"--workers={workers}"]


def train(c: Ctx, work: Path, store: Path, steps: int, *extra: str) -> list[str]:
    return [PY, "train.py", f"--workdir={work}", *TINY, f"--config.data.store={store}",
            f"--config.train.steps={steps}", *extra]


def no_store(out: Path) -> str:
    return "no store.json (no partial store claims to be complete)" if not (out / "store.json").exists() \
        else "STORE.JSON WRITTEN"


def tmp_left(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for p in out.rglob("*.tmp")] if out.exists() else []


def verify(c: Ctx, store: Path) -> str:
    r = c.run([PY, "-m", "stem_jax.data_prep", "--verify", f"--out={store}"])
    return "--verify: intact" if r.code == 0 and "is intact" in r.out else f"--verify FAILED: {r.last_err()}"


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return not re.search(r"^State:\s+Z", state, re.M)


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for t in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(x) for x in (t / "children").read_text().split()]
            except OSError:
                kids = []
            out += kids
            todo += kids
    return out


def last_step(work: Path) -> int | None:
    """The last step of ``work/metrics.jsonl`` (None before the first)."""
    f = work / "metrics.jsonl"
    steps = [int(x) for x in re.findall(r'"step": (\d+)', f.read_text())] if f.exists() else []
    return max(steps, default=None)


def wait_for(path: Path, p: subprocess.Popen, timeout: float = 240) -> bool:
    end = time.time() + timeout
    while not path.exists():
        if p.poll() is not None or time.time() > end:
            return False
        time.sleep(0.02)
    return True


# ------------------------------------------------------------------------------------------------ cases

def case_zst(c: Ctx) -> None:
    good = "".join(docs(400, 1))
    f = c.root / "zst" / "cut.jsonl.zst"
    f.parent.mkdir()
    raw = zstandard.ZstdCompressor().compress(good.encode())
    f.write_bytes(raw[:len(raw) * 2 // 5])  # an interrupted download
    before = sha(f)
    for skip in ("false", "true"):
        out = c.root / "zst" / f"s_{skip}"
        r = c.run(prep(c, str(f), out, f"--config.data.skip_bad_records={skip}"))
        c.record(f"truncated .jsonl.zst (skip={skip})", r, None,
                 f"input {'untouched' if sha(f) == before else 'CHANGED'}; {no_store(out)}")


def case_gz(c: Ctx) -> None:
    d = c.root / "gz"
    d.mkdir()
    raw = gzip.compress("".join(docs(400, 2)).encode())
    f = d / "cut.jsonl.gz"
    f.write_bytes(raw[:len(raw) // 2])
    before = sha(f)
    for skip in ("false", "true"):
        out = d / f"s_{skip}"
        r = c.run(prep(c, str(f), out, f"--config.data.skip_bad_records={skip}"))
        c.record(f"truncated .jsonl.gz (skip={skip})", r, None,
                 f"input {'untouched' if sha(f) == before else 'CHANGED'}; {no_store(out)}")
    crc = bytearray(raw)
    crc[-8] ^= 0xFF  # the CRC32 of the trailer
    g = d / "crc.jsonl.gz"
    g.write_bytes(bytes(crc))
    out = d / "s_crc"
    r = c.run(prep(c, str(g), out, "--config.data.skip_bad_records=true"))
    c.record(".gz with a bad CRC (skip=true)", r, None, f"{no_store(out)}")


def case_all_bad(c: Ctx) -> None:
    d = c.root / "allbad"
    d.mkdir()
    f = d / "bad.jsonl"
    f.write_text("".join(json.dumps({"body": f"record {i}"}) + "\n" for i in range(50)))
    out = d / "s"
    r = c.run(prep(c, str(f), out, "--config.data.skip_bad_records=true"))
    per_file = r.line(r"skipped \d+ bad record")
    c.record("all records bad (skip=true)", r, None, f"log: `{per_file}`; {no_store(out)}" if per_file else no_store(out))


def case_empty(c: Ctx) -> None:
    d = c.root / "empty"
    d.mkdir()
    f = d / "a.jsonl"
    f.write_text("")
    out = d / "s"
    r = c.run(prep(c, str(f), out))
    c.record("empty .jsonl", r, None, no_store(out))
    write_jsonl(f, 200, seed=3)  # the user fixes the file and reruns the same command
    r = c.run(prep(c, str(f), out))
    ok = (out / "store.json").exists() and store_meta(out)["train"]["documents"] + store_meta(out)["val"]["documents"] == 200
    c.record("empty .jsonl, then fixed, same --out", r, r.line(r"token store done") or r.last_err(),
             ("store complete, 200 of 200 documents; " + verify(c, out)) if ok else "STORE INCOMPLETE")


def base_store(c: Ctx, name: str, n_files: int = 3, seed: int = 10) -> tuple[Path, list[str], list[Path]]:
    """A store of ``n_files`` JSONL files built with data_prep: (store, the command, the inputs)."""
    d = c.root / name
    d.mkdir()
    inputs = [write_jsonl(d / f"part-{i}.jsonl", 300, seed=seed + i) for i in range(n_files)]
    out = d / "store"
    cmd = prep(c, ",".join(map(str, inputs)), out)
    r = c.run(cmd)
    if r.code != 0:
        raise RuntimeError(f"building {out} failed: {r.err[-2000:]}")
    return out, cmd, inputs


def case_bin_truncated(c: Ctx) -> None:
    store, cmd, _ = base_store(c, "bin")
    meta = store_meta(store)
    fp, keys = meta["content_fingerprint"], [u["key"] for u in meta["shards"]]
    cut = store / "shards" / f"{keys[1]}.train.bin"
    cut.write_bytes(cut.read_bytes()[:1000])
    others = {k: v for k, v in unit_files(store).items() if keys[1] not in k}
    r = c.run(train(c, c.root / "bin" / "run", store, 4))
    c.record("`.bin` shard truncated between runs: train.py", r, None,
             f"workdir {'not created' if not (c.root / 'bin' / 'run').exists() else 'created'}")
    r = c.run(cmd)  # the same data_prep command
    same = {k: v for k, v in unit_files(store).items() if keys[1] not in k} == others
    c.record("`.bin` shard truncated: the same data_prep again", r,
             " / ".join(x for x in (r.line("rebuilding unit"), r.line("resuming the token store"),
                                    r.line(r"tokenizing \d+ unit")) if x),
             f"other units' files {'not rewritten' if same else 'REWRITTEN'}; fingerprint "
             f"{'unchanged' if store_meta(store)['content_fingerprint'] == fp else 'CHANGED'}; {verify(c, store)}")


def _stop_under_training(c: Ctx, name: str, damage) -> None:
    store, cmd, _ = base_store(c, name, n_files=2, seed=20)
    work = c.root / name / "run"
    fp = store_meta(store)["content_fingerprint"]
    tcmd = train(c, work, store, 300, "--config.train.checkpoint_every=20")
    t = time.time()
    p = c.popen(tcmd)
    if not wait_for(work / "checkpoints" / "20", p):
        out, err = p.communicate()
        raise RuntimeError(f"{name}: no checkpoint 20: {err[-2000:]}")
    at = last_step(work)
    damage(store)
    out, err = p.communicate(timeout=300)
    r = Result(tcmd, p.returncode, out, err, time.time() - t)
    m = re.search(r"newest checkpoint, step (\d+)", err)
    stopped = last_step(work)
    last = int(m.group(1)) if m else None
    exists = last is not None and (work / "checkpoints" / str(last)).is_dir()
    # put the store back as the message says (repair, or the original command for a deleted store), then resume
    fix = c.run([PY, "-m", "stem_jax.data_prep", "--repair", f"--out={store}"] if store.exists() else cmd)
    same_fp = (store / "store.json").exists() and store_meta(store)["content_fingerprint"] == fp
    again = c.run(tcmd)
    resumed = again.line(r"resumed from the checkpoint at step")
    ok = again.code == 0 and resumed and f"step {last} " in resumed + " "
    c.record(name.replace("_", " "), r, None,
             f"damaged after step {at}, stopped after step {stopped}; named checkpoint {last} "
             f"{'exists' if exists else 'MISSING'}; after `{c.short(fix.cmd)}` (exit {fix.code}, fingerprint "
             f"{'same' if same_fp else 'DIFFERENT'}) the same train.py {'resumes at step ' + str(last) if ok else 'FAILED: ' + (resumed or again.last_err())} "
             f"and exits {again.code}")


def case_truncated_training(c: Ctx) -> None:
    def cut(store: Path) -> None:
        for p in (store / "shards").glob("*.train.bin"):
            os.truncate(p, p.stat().st_size // 3)
    _stop_under_training(c, "shard_truncated_while_training", cut)


def case_deleted_training(c: Ctx) -> None:
    _stop_under_training(c, "store_deleted_during_training", shutil.rmtree)


def case_fingerprints(c: Ctx) -> None:
    store, cmd, _ = base_store(c, "fp", n_files=2, seed=30)
    d = c.root / "fp"
    work = d / "run"
    r = c.run(train(c, work, store, 4, "--config.train.checkpoint_every=2"))
    if r.code != 0:
        raise RuntimeError(r.err[-2000:])
    c.workdir = work  # for the sampling and editing cases
    moved = shutil.copytree(store, d / "good_moved")
    r = c.run(train(c, work, moved, 6, "--config.train.checkpoint_every=2"))
    c.record("resume with an identical copy of the store at a new path", r,
             r.line(r"data\.store: ") or r.last_err(),
             f"`{r.line('resumed from the checkpoint')}`, ran to step {last_step(work)}" if r.line("resumed from")
             else "NOT RESUMED")
    shutil.rmtree(moved)
    other = [write_jsonl(d / f"other-{i}.jsonl", 300, seed=40 + i) for i in range(2)]
    rb = c.run(prep(c, ",".join(map(str, other)), moved))
    before = workdir_files(work)
    r = c.run(train(c, work, moved, 8, "--config.train.checkpoint_every=2"))
    c.record("another corpus rebuilt at the same store path", r, None,
             f"rebuild exit {rb.code}; workdir {changed(before, workdir_files(work))}")
    Tokenizer.from_str(Path(c.tok).read_text()).save(str(d / "same.json"))
    other_tok = d / "other.json"
    t = Tokenizer(models.BPE(unk_token=None))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(["gate down row " * 50], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    t.save(str(other_tok))
    fresh = d / "fresh"
    r = c.run(train(c, fresh, store, 4, f"--config.data.tokenizer={other_tok}"))
    c.record("fresh run with data.store and data.tokenizer=other.json", r, None,
             f"workdir {'not created' if not fresh.exists() else 'CREATED'}")


def case_five_files(c: Ctx) -> None:
    d = c.root / "five"
    d.mkdir()
    line = json.dumps({"text": " ".join(["stem table row token gate down"] * 10)}) + "\n"
    paths = [d / f"part-{i}.jsonl" for i in range(5)]
    paths[0].write_text(line + '{"text": "cut off\n' + line * 20)
    for p in paths[1:]:
        p.write_text(line * 30000)
    out = d / "s"
    cmd = prep(c, str(d / "part-*.jsonl"), out)
    r, started = run_stamped(c, cmd, r"^tokenizing \d+ unit")
    finished = len(list((out / "shards").glob("*.json")))
    # the pool's start-up alone: the same bad file as the only input
    alone, alone_started = run_stamped(c, prep(c, str(paths[0]), d / "alone"), r"^tokenizing \d+ unit")
    c.record("bad line early in the first of five files (2 workers)", r, None,
             f"error {r.seconds - started:.1f} s after the `tokenizing 5 unit(s)` line (the bad file alone: "
             f"{alone.seconds - alone_started:.1f} s, the pool's start-up; {r.seconds:.1f} s after the command "
             "started); "
             f"{finished} of 4 other units finished; "
             f"temporary files left: {len(tmp_left(out))}")
    kept = unit_files(out)
    paths[0].write_text(line * 21)  # fixed
    r = c.run(cmd)
    same = all(unit_files(out).get(k) == v for k, v in kept.items())
    c.record("... fixed, the same command again", r,
             " / ".join(x for x in (r.line("resuming the token store"), r.line(r"tokenizing \d+ unit")) if x),
             f"{rebuilt(r)} of 5 units tokenized in {r.seconds:.1f} s, {len(kept) // 3} reused "
             f"{'unchanged' if same else 'CHANGED'}; {verify(c, out)}")
    # the same with the bad line in the last file and one worker: the four other units finish first
    e = c.root / "five_last"
    e.mkdir()
    small = [write_jsonl(e / f"part-{i}.jsonl", 150, seed=50 + i) for i in range(5)]
    lines = small[4].read_text().splitlines(keepends=True)
    lines[2] = '{"text": "cut off\n'
    small[4].write_text("".join(lines))
    out = e / "s"
    cmd = prep(c, str(e / "part-*.jsonl"), out, workers=1)
    r = c.run(cmd)
    kept = unit_files(out)
    c.record("bad line in the last of five files (1 worker)", r, None,
             f"{len(kept) // 3} finished unit(s) kept; {no_store(out)}")
    write_jsonl(small[4], 151, seed=54)
    r = c.run(cmd)
    same = all(unit_files(out).get(k) == v for k, v in kept.items())
    c.record("... fixed, the same command again", r,
             " / ".join(x for x in (r.line("resuming the token store"), r.line(r"tokenizing \d+ unit")) if x),
             f"{rebuilt(r)} of 5 units tokenized, {len(kept) // 3} reused "
             f"{'unchanged (inode, mtime, sha256)' if same else 'CHANGED'}; "
             f"{verify(c, out)}")


def rebuilt(r: Result) -> str:
    """How many units a data_prep run tokenized, from its log line."""
    m = re.search(r"tokenizing (\d+) unit", r.out + r.err)
    return m.group(1) if m else "?"


def run_stamped(c: Ctx, cmd: list[str], pattern: str) -> tuple[Result, float]:
    """Run ``cmd``; also return when (seconds after the start) its stdout first printed a line matching
    ``pattern`` (the end, if never)."""
    t = time.time()
    p = c.popen(cmd)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(p.stderr.read()))
    reader.start()
    out, seen = [], None
    for line in p.stdout:
        out.append(line)
        if seen is None and re.search(pattern, line):
            seen = time.time() - t
    p.wait()
    reader.join()
    end = time.time() - t
    return Result(cmd, p.returncode, "".join(out), "".join(err), end), end if seen is None else seen


def big_corpus(c: Ctx, name: str, n_files: int = 3, lines: int = 15000) -> Path:
    d = c.root / name
    d.mkdir()
    for i in range(n_files):
        write_jsonl(d / f"part-{i}.jsonl", lines, seed=60 + i)
    return d


def case_two_preps(c: Ctx) -> None:
    d = big_corpus(c, "two")
    out = d / "s"
    cmd = prep(c, str(d / "part-*.jsonl"), out)
    t = time.time()
    ps = [c.popen(cmd), c.popen(cmd)]
    rs = [Result(cmd, p.returncode, *p.communicate(timeout=300), 0) for p in ps]
    for r in rs:
        r.code, r.seconds = ps[rs.index(r)].returncode, time.time() - t
    built = sum(bool(r.line(r"tokenizing [1-9]\d* unit")) for r in rs)
    refused = [r for r in rs if r.code != 0]
    for i, r in enumerate(rs):
        c.record(f"two data_prep on the same --out: #{i + 1}", r,
                 r.last_err() if r.code else (r.line(r"token store done") or r.line("tokenizing")),
                 f"{len(refused)} of 2 refused, {built} of 2 tokenized" if i == 0 else verify(c, out))


def case_kill9(c: Ctx) -> None:
    d = big_corpus(c, "kill", n_files=6, lines=12000)
    out = d / "s"
    cmd = prep(c, str(d / "part-*.jsonl"), out)
    t = time.time()
    p = c.popen(cmd)
    for line in p.stdout:
        if line.startswith("tokenizing"):
            break
    end = time.time() + 60
    while (len(list((out / "shards").glob("*.json"))) < 1 or len(list((out / "shards").glob(".*.tmp"))) < 2) \
            and time.time() < end and p.poll() is None:
        time.sleep(0.01)  # a unit has finished and the workers are writing the next ones
    family = descendants(p.pid)
    units = lambda: sorted(q.name for q in (out / "shards").glob("*.json"))  # noqa: E731
    done = units()
    killed = time.time()
    os.kill(p.pid, signal.SIGKILL)  # the main pid only, as `kill -9 PID` does
    p.wait()
    while any(alive(q) for q in family) and time.time() < killed + 10:
        time.sleep(0.01)
    gone = time.time() - killed
    time.sleep(3)
    left = [q for q in family if alive(q)]
    after = units()
    try:
        out_rest, err = p.stdout.read(), ""
        _, err = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        err = "(stderr still held open 10 s after the kill)"
    r = Result(cmd, p.returncode, out_rest, err, time.time() - t)
    c.record("kill -9 of data_prep", r, f"killed with {len(done)} of 6 units done ({len(after)} after its processes were gone); "
             f"{len(family)} child process(es) before the kill, all gone {gone:.2f} s after it, "
             f"{len(left)} alive 3 s later; "
             f"stderr after the kill: {len(err.strip().splitlines())} line(s)"
             + (", **BrokenPipeError**" if "BrokenPipe" in err else ", no BrokenPipeError")
             + (f": `{_first_message(err)}`" if err.strip() else ""),
             f"{len(after)} finished unit(s): see the rerun below", killed=True)
    kept = unit_files(out)
    r = c.run(cmd)
    same = all(unit_files(out).get(k) == v for k, v in kept.items())
    n = store_meta(out)["train"]["documents"] + store_meta(out)["val"]["documents"] if (out / "store.json").exists() else 0
    c.record("... the same command again", r,
             " / ".join(x for x in (r.line("resuming the token store"), r.line(r"tokenizing \d+ unit")) if x),
             f"the {len(kept) // 3} finished unit(s) {'not rewritten' if same else 'REWRITTEN'}; "
             f"{n:,} of 72,000 documents; temporary files left: {len(tmp_left(out))}; {verify(c, out)}")


def _first_message(err: str) -> str:
    """The gist of what a process printed: its error or warning line, without the file and line prefix."""
    for line in err.strip().splitlines():
        m = re.search(r"\b(\w+(Error|Warning|Exception)\b.*)", line)
        if m:
            return m.group(1)
    return err.strip().splitlines()[0]


def _limited(max_bytes: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, resource.RLIM_INFINITY))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
    return preexec


def case_disk_full(c: Ctx) -> None:
    d = c.root / "full"
    d.mkdir()
    f = write_jsonl(d / "a.jsonl", 3000, seed=70)
    out = d / "s"
    cmd = prep(c, str(f), out)
    tok_bytes = len(Tokenizer.from_file(str(c.tok)).to_str())  # as the store writes it
    for limit, what in ((tok_bytes // 2, "tokenizer.json"), (tok_bytes + 4096, "a shard")):
        r = c.run(cmd, preexec_fn=_limited(limit))
        c.record(f"disk full (`ulimit -f` {limit // 1024} KiB: {what} fails)", r, None,
                 f"temporary files left: {len(tmp_left(out))}; {no_store(out)}")
    r = c.run(cmd)
    c.record("... the same command without the limit", r, r.line("token store done") or r.last_err(),
             f"temporary files left: {len(tmp_left(out))}; {verify(c, out)}")


def _workdir(c: Ctx) -> Path:
    if getattr(c, "workdir", None) is None:
        store, _, _ = base_store(c, "wd", n_files=2, seed=80)
        work = c.root / "wd" / "run"
        r = c.run(train(c, work, store, 4, "--config.train.checkpoint_every=2"))
        if r.code != 0:
            raise RuntimeError(r.err[-2000:])
        c.workdir = work
    return c.workdir


def case_edits_utf8(c: Ctx) -> None:
    work = _workdir(c)
    f = c.root / "edits.jsonl"
    f.write_bytes(json.dumps({"prompt": "the row of", "source": " row", "target": " gate"}).encode() + b"\n"
                  + b'{"prompt": "the table", "source": " table", "target": " \xff"}\n')
    before, wd = sha(f), workdir_files(work)
    r = c.run([PY, "-m", "stem_jax.editing", "edit", f"--workdir={work}", f"--edits={f}"])
    c.record("edits file with a non-UTF-8 line", r, None,
             f"edits file {'untouched' if sha(f) == before else 'CHANGED'}; workdir {changed(wd, workdir_files(work))}")


def case_temperature(c: Ctx) -> None:
    work = _workdir(c)
    for t in ("nan", "inf"):
        before = workdir_files(work)
        r = c.run([PY, "-m", "stem_jax.sampling", f"--workdir={work}", "--prompt=the row", f"--temperature={t}"])
        c.record(f"sampling --temperature {t}", r, None, f"workdir {changed(before, workdir_files(work))}")


def case_inject(c: Ctx) -> None:
    work = _workdir(c)
    before = workdir_files(work)
    dst = work / "checkpoints" / "99"
    r = c.run([PY, "-m", "stem_jax.editing", "inject", f"--workdir={work}", "--source= row", "--target= gate",
               f"--out={dst}"])
    c.record("editing inject --out RUN/checkpoints/99", r, None,
             f"{'no' if not dst.exists() else 'A'} checkpoints/99; workdir {changed(before, workdir_files(work))}")


CASES = {"zst": case_zst, "gz": case_gz, "allbad": case_all_bad, "empty": case_empty, "bin": case_bin_truncated,
         "truncated_training": case_truncated_training, "deleted_training": case_deleted_training,
         "fingerprints": case_fingerprints, "five": case_five_files, "two": case_two_preps, "kill9": case_kill9,
         "disk": case_disk_full, "edits": case_edits_utf8, "temperature": case_temperature, "inject": case_inject}


def table(c: Ctx, total: float) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| row | command | exit | one-line outcome | traceback? | data kept? |", "|---|---|---|---|---|---|"]
    for r in c.rows:
        lines.append(f"| {esc(r['row'])} | `{esc(r['command'])}` | {r['exit']} | {esc(r['outcome'])} | "
                     f"{'**yes**' if r['traceback'] else 'no'} | {esc(r['kept'])} |")
    tbs = sum(r["traceback"] for r in c.rows)
    head = [
        "# Data faults (issue 28), reproduced through the command lines",
        "",
        "[Back to data.md](data.md) · written by `python benchmarks/data_faults.py --out docs/data_faults.md`",
        "",
        f"{len(c.rows)} recorded commands, {tbs} with a traceback or fatal signal; total {total:.0f} s on this machine "
        f"({os.cpu_count()} cores). Every command ran in a fresh temporary folder with `JAX_PLATFORMS=cpu` and "
        "`STEM_JAX_CACHE` inside it. Commands are shortened: `--config.` is dropped, paths are relative to the "
        "folder, and every `data_prep` also had `data.source=jsonl data.tokenizer=tok.json model.vocab_size=512` "
        "(a 400-token BPE) and `--workers=2` unless shown, every `train.py` the tiny model "
        f"`{' '.join(a.replace('--config.', '') for a in TINY)}`. *data kept?* is checked by this script from the "
        "files (sha256, inode and mtime of the input, of the other units' shards and of the workdir, "
        "`data_prep --verify`, the named checkpoint resumed by the same `train.py`).",
        "",
        f"Rows with a traceback or fatal signal: {', '.join(r['row'] for r in c.rows if r['traceback']) or 'none'}. "
        f"Rows where data was lost or changed: {', '.join(r['row'] for r in c.rows if LOST.search(r['kept'])) or 'none'}.",
        "",
    ]
    return "\n".join(head + lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="write the markdown report here (default: print it)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {','.join(CASES)}")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="data_faults_"))
    c = Ctx(root)
    c.workdir = None
    t = time.time()
    try:
        make_tokenizer(c.tok)
        for name in a.cases.split(","):
            try:
                CASES[name](c)
            except Exception as e:  # noqa: BLE001 - a case that cannot run is a row of the report, not the end
                msg = str(e).strip().splitlines()
                c.rows.append(dict(row=f"{name}: THE CASE DID NOT RUN", command="", exit="", traceback=True,
                                   outcome=f"{type(e).__name__}: {(msg[-1] if msg else '')[:300]}", kept="?",
                                   seconds=0))
                print(f"[{name}] did not run: {type(e).__name__}: {e}", flush=True)
    finally:
        if a.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report = table(c, time.time() - t)
    if a.out:
        Path(a.out).write_text(report)
        print(f"wrote {a.out}")
    else:
        print(report)


if __name__ == "__main__":
    main()
