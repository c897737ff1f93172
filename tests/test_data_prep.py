"""data_prep against broken input and a broken environment: each case ends in one line (or a correct store),
with its exit code, and nothing already written is lost or silently changed (issue 28's table)."""
import dataclasses
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from test_corpus import _user_tokenizer, _write_jsonl
from stem_jax import cli, corpus, data_prep, prep_pool, sources, store
from stem_jax.config import Config, DataConfig, ModelConfig

QUIET = dict(log=lambda *_: None)
VOCAB = 512


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> str:
    """A user's tokenizer file: no BPE is trained per build, and no build reads its input before the workers."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = [json.loads(x)["text"] for x in Path(_write_jsonl(path.with_name("t.jsonl"), 300)).read_text().splitlines()]
    _user_tokenizer(path, texts, vocab=400)
    return str(path)


def _cfg(data: DataConfig) -> Config:
    return Config(model=ModelConfig(vocab_size=VOCAB), data=data)


def _cli(capsys, fn, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``fn`` run as data_prep's main runs it (one-line user errors)."""
    capsys.readouterr()
    try:
        cli.run_user_errors(fn, *args)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _prep(capsys, data: DataConfig, out: Path, workers: int = 2) -> tuple[int, str, str]:
    return _cli(capsys, data_prep.prepare, _cfg(data), str(out), workers)


def _one_error(err: str) -> str:
    """The single line an error printed (no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def _tokens(c: corpus.Corpus) -> dict:
    return {s: getattr(c, s).read(0, len(getattr(c, s))) for s in ("train", "val")}


def _same_tokens(a: corpus.Corpus, b: corpus.Corpus) -> None:
    for s, t in _tokens(a).items():
        np.testing.assert_array_equal(t, _tokens(b)[s])
    assert a.fingerprint == b.fingerprint


def _same_as(out: Path, tokens: dict, fingerprint: str) -> None:
    """The store at ``out`` opens, holds ``tokens`` (read before it was damaged) and has that content
    fingerprint. Read from the shard files here: this process still holds descriptors of the replaced ones."""
    c = corpus.open_store(out)
    for s, t in tokens.items():
        files = [store.shard_path(out, u["key"], s) for u in c.meta["shards"]]
        np.testing.assert_array_equal(np.concatenate([np.fromfile(f, c.meta["dtype"]) for f in files]), t)
    assert c.fingerprint == fingerprint


def _files(folder: Path) -> dict[str, tuple]:
    """Every file under ``folder``: (inode, mtime_ns, sha256) -- a rewrite changes the first two."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _unit_files(out: Path) -> dict[str, tuple]:
    return {k: v for k, v in _files(out).items() if corpus.SHARD_FILE.match(Path(k).name)}


def _five_files(tmp_path: Path, n: int, bad: int | None = None, bad_line: int = 2) -> list[Path]:
    paths = [Path(_write_jsonl(tmp_path / f"part-{i}.jsonl", n, seed=i)) for i in range(5)]
    if bad is not None:
        lines = paths[bad].read_text().splitlines(keepends=True)
        lines[bad_line - 1] = '{"text": "cut off\n'
        paths[bad].write_text("".join(lines))
    return paths


def _fix(path: Path, n: int, seed: int) -> None:
    """The user's fixed file: new content, size and modification time."""
    _write_jsonl(path, n + 1, seed=seed)


def test_all_records_bad_with_skip_says_how_many_were_skipped(tmp_path, capsys, tok):
    f = tmp_path / "bad.jsonl"
    f.write_text("".join(json.dumps({"body": f"record {i}"}) + "\n" for i in range(50)))
    data = DataConfig(source="jsonl", files=str(f), skip_bad_records=True, tokenizer=tok)
    code, out, err = _prep(capsys, data, tmp_path / "s")
    assert code == 1 and _one_error(err) == (
        f"error: StoreError: data.source='jsonl' has no documents: all 50 record(s) were bad, and "
        f"data.skip_bad_records=true skipped them (50 in {f}); fix the records or data.text_key")
    assert f"skipped 50 bad record(s) of {f} (data.skip_bad_records=true)" in out


def test_skipped_records_are_counted_per_file_and_a_unit_that_skipped_is_rebuilt_without_skip(tmp_path, capsys, tok):
    a, b = Path(_write_jsonl(tmp_path / "a.jsonl", 100)), Path(_write_jsonl(tmp_path / "b.jsonl", 100, seed=1))
    for path, bad in ((a, (3, 10, 50)), (b, (7, 8))):
        lines = path.read_text().splitlines(keepends=True)
        for i in bad:
            lines[i] = "not json\n"
        path.write_text("".join(lines))
    data = DataConfig(source="jsonl", files=f"{a},{b}", skip_bad_records=True, tokenizer=tok, val_every=5)
    code, out, err = _prep(capsys, data, tmp_path / "s")
    assert code == 0, err
    assert f"skipped 3 bad record(s) of {a}" in out and f"skipped 2 bad record(s) of {b}" in out
    c = corpus.open_store(tmp_path / "s")
    assert c.meta["skipped_records"] == 5 and c.meta["train"]["documents"] + c.meta["val"]["documents"] == 195
    code, out, err = _prep(capsys, dataclasses.replace(data, skip_bad_records=False), tmp_path / "s", workers=1)
    assert code == 1 and _one_error(err).startswith(f"error: BadRecordError: {a}:4: the record is not JSON")
    assert "it skipped 3 bad record(s) and data.skip_bad_records is off" in out


def test_an_empty_file_then_the_fixed_file_in_the_same_out(tmp_path, capsys, tok):
    f = tmp_path / "a.jsonl"
    f.write_text("")
    data, out = DataConfig(source="jsonl", files=str(f), tokenizer=tok, val_every=5), tmp_path / "s"
    code, _, err = _prep(capsys, data, out)
    assert code == 1 and _one_error(err) == "error: StoreError: data.source='jsonl' has no documents"
    empty = _unit_files(out)
    assert len(empty) == 3  # the finished (empty) unit is kept ...
    _write_jsonl(f, 200)
    code, log, err = _prep(capsys, data, out)
    assert code == 0, err  # ... and no longer makes the folder refuse the fixed file
    assert "tokenizing 1 unit(s)" in log
    c = corpus.open_store(out)
    _same_tokens(c, corpus.open_store(corpus.build_store(data, VOCAB, tmp_path / "clean", **QUIET)))
    assert not set(empty) & set(_unit_files(out))  # the empty unit's files went when the store completed
    assert len(_unit_files(out)) == 3


def test_a_damaged_shard_is_named_verified_and_only_its_unit_rebuilt(tmp_path, capsys, tok):
    files = ",".join(map(str, _five_files(tmp_path, 200)[:3]))
    data, out = DataConfig(source="jsonl", files=files, tokenizer=tok, val_every=5), tmp_path / "s"
    assert _prep(capsys, data, out)[0] == 0
    ref = corpus.open_store(out)
    ref_tokens = _tokens(ref)
    keys = [u["key"] for u in ref.meta["shards"]]
    # a shard truncated between runs: open names store, shard and the repair command
    cut = store.shard_path(out, keys[1], "train")
    cut.write_bytes(cut.read_bytes()[:1000])
    with pytest.raises(store.StoreDamagedError) as e:
        corpus.open_store(out)
    assert str(out) in str(e.value) and str(cut) in str(e.value)
    assert f"python -m stem_jax.data_prep --repair --out {out}" in str(e.value)
    code, _, err = _cli(capsys, data_prep.verify, str(out))
    assert code == 1 and _one_error(err) == (f"error: StoreDamagedError: the token store {out} has 1 damaged shard(s): "
                                             f"{cut.name}; repair it with `python -m stem_jax.data_prep --repair "
                                             f"--out {out}` (rebuilds only the damaged units)")
    # rerunning the same data_prep command rebuilds that unit only
    kept = {k: v for k, v in _unit_files(out).items() if keys[1] not in k}
    code, log, err = _prep(capsys, data, out)
    assert code == 0, err
    assert f"rebuilding unit {keys[1]} ({files.split(',')[1]}): {cut} has 1000 bytes" in log
    assert f"resuming the token store at {out}: 2 of 3 units already done" in log and "tokenizing 1 unit(s)" in log
    assert {k: v for k, v in _unit_files(out).items() if keys[1] not in k} == kept  # not rewritten
    _same_as(out, ref_tokens, ref.fingerprint)
    # a flipped byte keeps the size: open does not see it, --verify does, and --repair rebuilds that unit only
    flip = store.shard_path(out, keys[0], "train")
    raw = bytearray(flip.read_bytes())
    raw[10] ^= 1
    flip.write_bytes(bytes(raw))
    corpus.open_store(out)
    assert _cli(capsys, data_prep.verify, str(out))[0] == 1
    kept = {k: v for k, v in _unit_files(out).items() if keys[0] not in k}
    code, log, err = _cli(capsys, data_prep.repair, str(out), 1)
    assert code == 0, err
    assert f"rebuilding unit {keys[0]}" in log and "tokenizing 1 unit(s)" in log
    assert {k: v for k, v in _unit_files(out).items() if keys[0] not in k} == kept
    _same_as(out, ref_tokens, ref.fingerprint)
    code, out_text, _ = _cli(capsys, data_prep.verify, str(out))
    assert code == 0 and f"the token store {out} is intact" in out_text


def test_repair_refuses_a_store_whose_input_changed(tmp_path, capsys, tok):
    f = Path(_write_jsonl(tmp_path / "a.jsonl", 100))
    data, out = DataConfig(source="jsonl", files=str(f), tokenizer=tok, val_every=5), tmp_path / "s"
    corpus.build_store(data, VOCAB, out, **QUIET)
    mine = (out / "tokenizer.json").read_text()
    corpus.train_tokenizer(["another tokenizer"], 300).save(str(out / "tokenizer.json"))
    code, _, err = _cli(capsys, data_prep.repair, str(out), 1)
    assert code == 1 and _one_error(err).startswith(f"error: StoreError: {out / 'tokenizer.json'} is not the "
                                                    f"tokenizer the store was tokenized with")
    (out / "tokenizer.json").write_text(mine)
    before = _files(out)
    _fix(f, 100, seed=3)
    code, _, err = _cli(capsys, data_prep.repair, str(out), 1)
    assert code == 1 and _one_error(err).startswith(f"error: StoreError: --repair rebuilds damaged units from the "
                                                    f"inputs the store was built from, but '{f}' changed since")
    assert _files(out) == before


def test_a_bad_line_in_the_last_of_five_files_then_fixed_rebuilds_only_that_file(tmp_path, capsys, tok):
    paths = _five_files(tmp_path, 150, bad=4, bad_line=3)
    data = DataConfig(source="jsonl", files=str(tmp_path / "part-*.jsonl"), tokenizer=tok, val_every=5)
    out = tmp_path / "s"
    code, _, err = _prep(capsys, data, out, workers=1)  # one worker: the bad file is tokenized last
    assert code == 1 and _one_error(err).startswith(f"error: BadRecordError: {paths[4]}:3: the record is not JSON")
    kept = _unit_files(out)
    assert len(kept) == 4 * 3 and not (out / "store.json").exists()  # 4 units finished, kept
    _fix(paths[4], 150, seed=4)
    code, log, err = _prep(capsys, data, out, workers=1)
    assert code == 0, err
    assert f"resuming the token store at {out}: 4 of 5 units already done" in log and "tokenizing 1 unit(s)" in log
    now = _unit_files(out)
    assert {k: now[k] for k in kept} == kept and len(now) == 5 * 3  # the 4 untouched, 1 new
    _same_tokens(corpus.open_store(out), corpus.open_store(corpus.build_store(data, VOCAB, tmp_path / "clean",
                                                                              workers=2, **QUIET)))


def test_a_bad_line_early_in_the_first_of_five_files_stops_the_workers_at_once(tmp_path, capsys, tok):
    """Every other unit takes far longer (seconds) than the error takes to arrive (milliseconds): the pool stops
    before any of them finishes. (Fixing the file then rebuilds only its units: the test above.)"""
    line = json.dumps({"text": " ".join(["stem table row token gate down"] * 10)}) + "\n"
    paths = [tmp_path / f"part-{i}.jsonl" for i in range(5)]
    paths[0].write_text(line + '{"text": "cut off\n' + line * 20)
    for p in paths[1:]:
        p.write_text(line * 30000)
    data = DataConfig(source="jsonl", files=str(tmp_path / "part-*.jsonl"), tokenizer=tok, val_every=5)
    out = tmp_path / "s"
    code, _, err = _prep(capsys, data, out, workers=2)
    finished = len(list((out / "shards").glob("*.json")))
    assert code == 1 and _one_error(err).startswith(f"error: BadRecordError: {paths[0]}:2: the record is not JSON")
    assert finished == 0  # waiting for the pool would have let all 4 others finish
    assert not list(out.rglob("*.tmp"))  # the stopped workers' temporary files are gone


def test_a_worker_killed_in_the_middle_stops_the_build_with_one_line(tmp_path, capsys, tok):
    """A worker that dies (the OOM killer, a signal) would leave its unit unfinished for ever: the pool is stopped
    and the death named (without it, the build hangs)."""
    line = json.dumps({"text": " ".join(["stem table row token gate down"] * 10)}) + "\n"
    for i in range(3):
        (tmp_path / f"part-{i}.jsonl").write_text(line * (30000 + i))  # a unit takes seconds
    data = DataConfig(source="jsonl", files=str(tmp_path / "part-*.jsonl"), tokenizer=tok, val_every=5)
    out, killed, result = tmp_path / "s", [], {}

    def build():
        result["prep"] = _prep(capsys, data, out, workers=2)
    builder = threading.Thread(target=build, daemon=True)
    builder.start()
    deadline = time.time() + 60
    while not killed and time.time() < deadline:
        tmp = next((out / "shards").glob(".*.train.bin.*.tmp"), None) if (out / "shards").is_dir() else None
        if tmp is None:
            time.sleep(0.01)  # until a worker writes its first shard
            continue
        killed.append((int(tmp.name.split(".")[-2]), tmp.name[1:17]))
        os.kill(killed[0][0], signal.SIGKILL)
    builder.join(60)
    assert killed and not builder.is_alive(), "the build hangs after its worker was killed"
    code, _, err = result["prep"]
    pid, key = killed[0]
    path = next(u["path"] for u in json.loads((out / "plan.json").read_text())["units"] if u["key"] == key)
    assert code == 1 and _one_error(err) == (
        f"error: StoreError: a tokenizer worker (pid {pid}) died while tokenizing {path} (killed by a signal: out "
        f"of memory?); the units finished so far are kept: run the same command again")
    assert not list(out.rglob("*.tmp"))


def test_a_second_data_prep_on_the_same_out_is_refused_naming_the_holder(tmp_path, capsys, tok):
    f = _write_jsonl(tmp_path / "a.jsonl", 100)
    data, out = DataConfig(source="jsonl", files=f, tokenizer=tok, val_every=5), tmp_path / "s"
    corpus.build_store(data, VOCAB, out, **QUIET)
    before = _files(out)
    with corpus._one_builder(out, print):  # what a running data_prep holds (a second open file: flock conflicts)
        holder = (out / corpus.BUILD_LOCK).read_text()
        code, _, err = _prep(capsys, data, out)
    assert holder.startswith(f"pid {os.getpid()} on ")
    assert code == 1 and _one_error(err) == (
        f"error: StoreError: the token store {out} is being built by {holder} (it holds {out / corpus.BUILD_LOCK}); "
        f"wait for that build to end, or stop it and run this command again: finished units are kept")
    assert {k: v for k, v in _files(out).items() if k != corpus.BUILD_LOCK} == \
        {k: v for k, v in before.items() if k != corpus.BUILD_LOCK}
    code, log, err = _prep(capsys, data, out)  # free again: the rerun checks the complete store, changes nothing
    assert code == 0 and "resuming the token store" in log and "tokenizing 0 unit(s)" in log, err
    assert _unit_files(out) == {k: v for k, v in before.items() if corpus.SHARD_FILE.match(Path(k).name)}


def test_a_failed_cache_build_removes_its_folder_and_an_interrupted_one_keeps_its_work(tmp_path, monkeypatch, tok):
    paths = _five_files(tmp_path, 100, bad=1)
    data = DataConfig(source="jsonl", files=f"{paths[0]},{paths[1]}", tokenizer=tok, val_every=5,
                      cache_dir=str(tmp_path / "cache"), workers=1)
    with pytest.raises(sources.BadRecordError, match=f"{paths[1]}:2"):
        corpus.load_corpus(data, VOCAB, **QUIET)
    assert not list((tmp_path / "cache").iterdir())  # unit 0 had finished: gone with its folder
    _fix(paths[1], 100, seed=1)
    real = prep_pool.run_workers

    def interrupted(todo, *args):
        real(todo[:1], *args)
        raise KeyboardInterrupt
    monkeypatch.setattr(prep_pool, "run_workers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        corpus.load_corpus(data, VOCAB, **QUIET)
    (folder,) = (tmp_path / "cache").iterdir()
    assert len(list((folder / "shards").glob("*.json"))) == 1
    monkeypatch.setattr(prep_pool, "run_workers", real)
    logs = []
    c = corpus.load_corpus(data, VOCAB, log=logs.append)
    assert c.path == folder and f"resuming the token store at {folder}: 1 of 2 units already done" in logs


def test_a_process_waiting_on_a_cache_build_that_fails_and_removes_its_folder_builds_it_anew(tmp_path):
    """The other processes of a run wait on the builder's lock; when its build fails, it removes the folder (and
    the lock file they wait on): a waiter then locks a new folder and reports the input's own error."""
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "one two"}\n{"body": "three"}\n')
    data = DataConfig(source="jsonl", files=str(f), val_every=2, cache_dir=str(tmp_path / "cache"), workers=1)
    folder = tmp_path / "cache" / corpus.fingerprint(data, VOCAB, sources.plan(data, lambda *_: None)[0])
    waiting, result = threading.Event(), {}

    def waiter():
        try:
            corpus.load_corpus(data, VOCAB, log=lambda m: m.startswith("waiting for") and waiting.set())
        except Exception as e:  # noqa: BLE001 - the test inspects it
            result["error"] = e
    with corpus._one_builder(folder, print):  # the builder, as another process holds it
        t = threading.Thread(target=waiter)
        t.start()
        assert waiting.wait(60)
        shutil.rmtree(folder)  # its build failed
    t.join(60)
    assert isinstance(result.get("error"), sources.BadRecordError), result
    assert "a.jsonl:2: the record has no field 'text'" in str(result["error"]) and not folder.exists()


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for t in Path(f"/proc/{p}/task").glob("*"):
            with open(t / "children") as f:
                kids = [int(c) for c in f.read().split()]
            out += kids
            todo += kids
    return out


def _prep_command(data: DataConfig, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "stem_jax.data_prep", f"--config.data.source={data.source}",
            f"--config.data.files={data.files}", f"--config.data.tokenizer={data.tokenizer}",
            f"--config.model.vocab_size={VOCAB}", f"--out={out}", f"--workers={workers}"]


def test_kill_9_of_data_prep_takes_its_workers_along_quietly(tmp_path, tok):
    """The workers stop mid-unit (no unit finishes after the kill) and print nothing."""
    for i in range(3):
        _write_jsonl(tmp_path / f"part-{i}.jsonl", 15000, seed=i)  # a unit takes about a second
    data = DataConfig(source="jsonl", files=str(tmp_path / "part-*.jsonl"), tokenizer=tok)
    out = tmp_path / "s"
    p = subprocess.Popen(_prep_command(data, out, 2), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    for line in p.stdout:  # the builder says so just before it starts the workers
        if line.startswith("tokenizing 3 unit(s)"):
            break
    deadline = time.time() + 60
    while len(list((out / "shards").glob(".*.tmp"))) < 4:
        assert time.time() < deadline and p.poll() is None, p.stderr.read()[-3000:]
        time.sleep(0.01)  # until both workers are writing their first unit's shards
    family = _descendants(p.pid)  # the fork server, the resource tracker, the workers
    workers = [q for q in family if any((out / "shards").glob(f".*.{q}.tmp"))]
    assert len(workers) == 2, family
    fds = {q: os.pidfd_open(q) for q in family}
    os.kill(p.pid, signal.SIGKILL)  # the leader only, as `kill -9 PID` does: its group is not signalled
    p.wait()
    deadline = time.time() + 10
    while fds:
        ready, _, _ = select.select(list(fds.values()), [], [], max(deadline - time.time(), 0))
        assert ready, f"still running 10 s after data_prep died: {list(fds)}"
        for q in [q for q, fd in fds.items() if fd in ready]:
            os.close(fds.pop(q))
    assert not list((out / "shards").glob("*.json"))  # the workers died mid-unit, not after finishing it
    err = p.stderr.read()  # EOF: every process that held the terminal's stderr is gone
    assert not err.strip(), err[-3000:]  # no traceback, no BrokenPipeError, no resource tracker warning
    logs = []
    resumed = corpus.open_store(corpus.build_store(data, VOCAB, out, workers=2, log=logs.append))
    assert resumed.meta["train"]["documents"] + resumed.meta["val"]["documents"] == 3 * 15000
    assert not list(out.rglob("*.tmp"))  # the killed workers' temporary files went on the rerun


def _limited(command: list[str], max_bytes: int) -> list[str]:
    """``command`` under a file size limit of ``max_bytes`` (rounded down to KiB), set by a shell rather than a
    preexec_fn (a fork of this multithreaded process running Python). SIGXFSZ ignored: a write past the limit
    fails with EFBIG, as on a full disk."""
    return ["bash", "-c", f"ulimit -f {max_bytes // 1024} && trap '' XFSZ && exec \"$@\"", "bash", *command]


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary_file(tmp_path, tok):
    f = _write_jsonl(tmp_path / "a.jsonl", 3000)
    data, out = DataConfig(source="jsonl", files=f, tokenizer=tok), tmp_path / "s"
    tok_bytes = len(corpus.read_tokenizer(tok).to_str())
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for limit, what in ((tok_bytes // 2, out / "tokenizer.json"), (tok_bytes + 4096, out / "shards")):
        r = subprocess.run(_limited(_prep_command(data, out, 2), limit), cwd=REPO, capture_output=True, text=True,
                           env=env)
        line = _one_error(r.stderr)
        assert r.returncode == 1 and line.startswith(f"error: StoreError: cannot write {what}"), r.stderr[-3000:]
        assert "(File too large); nothing half-written was kept" in line
        assert not list(out.rglob("*.tmp")), list(out.rglob("*"))
    assert corpus.read_tokenizer(out / "tokenizer.json").to_str() == corpus.read_tokenizer(tok).to_str()
    assert re.search(r"shards/[0-9a-f]{16}\.(train|val)\.bin \(", line)
    r = subprocess.run(_prep_command(data, out, 2), cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_tokens(corpus.open_store(out), corpus.open_store(corpus.build_store(data, VOCAB, tmp_path / "clean", **QUIET)))
