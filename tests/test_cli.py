"""train.py / eval.py end to end, as a user runs them (one CPU device per subprocess)."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_script
SMALL = ["--config.model.d_model=64", "--config.model.n_layers=3", "--config.model.n_heads=4",
         "--config.model.n_kv_heads=2", "--config.model.d_ff=128", "--config.model.seq_len=64",
         "--config.train.batch_size=8", "--config.train.steps=30", "--config.train.log_every=10",
         "--config.train.warmup_steps=5", "--config.train.eval_batches=4"]


run = run_script


def test_train_then_eval_on_embedded_corpus(tmp_path, cache_dir):
    work = tmp_path / "run"
    r = run("train.py", f"--workdir={work}", *SMALL, cache_dir=cache_dir, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "STEM layers ('1/3' of 3): [1]" in r.stdout
    assert "active per token" in r.stdout and "mesh data=1, fsdp=1, tensor=1" in r.stdout
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == [10, 20, 30]
    assert all(row["tokens_per_sec"] > 0 for row in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    assert steps[-1]["loss"] < 0.8 * math.log(8192)
    final = rows[-1]
    assert set(final) == {"step", "val_loss", "val_ppl", "val_acc"} and final["step"] == 30
    assert 0 < final["val_acc"] < 1
    assert any(p.name.startswith("events.out.tfevents") for p in (work / "tensorboard").iterdir())
    assert (work / "checkpoints" / "30").is_dir() and (work / "config.json").is_file()

    metrics_before = (work / "metrics.jsonl").read_text()
    r = run("train.py", f"--workdir={work}", *SMALL, cache_dir=cache_dir, cwd=tmp_path)
    assert r.returncode == 0 and "already trained to step 30 (train.steps=30); nothing to do" in r.stdout
    assert (work / "metrics.jsonl").read_text() == metrics_before  # the finished run is untouched

    r = run("eval.py", f"--workdir={work}", cache_dir=cache_dir, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((work / "eval.json").read_text())
    assert ev["step"] == 30
    assert abs(ev["val_loss"] - final["val_loss"]) < 1e-4
    assert abs(ev["val_ppl"] - math.exp(ev["val_loss"])) < 1e-6 * ev["val_ppl"]


def test_unknown_config_key_suggests_the_right_one(tmp_path, cache_dir):
    r = run("train.py", f"--workdir={tmp_path / 'w'}", "--config.train.stesp=3", cache_dir=cache_dir)
    assert r.returncode != 0
    assert "unknown config key 'train.stesp'" in r.stderr and "did you mean 'train.steps'" in r.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("args,msg", [
    (["--config.mesh.data=2"], "needs 2 devices, but 1 are available"),
    (["--config.model.stem_layers=1/5"], "unknown stem_layers '1/5'"),
    (["--config.model.stem_layers=0,9"], "out of range for n_layers=6"),
    (["--config.model.stem_dim=256"], "must equal model.d_ff=512"),
    (["--config=configs/nope.py"], "No such file or directory"),
    (["--config.train.steps=abc"], "flag --config.train.steps=abc: invalid literal for int()"),
    (["--config.train.checkpoint_every=-1"], "train.checkpoint_every=-1 must be >= 0"),
    (["--config.data.source=text", "--config.data.files=/no/such.txt"], "'/no/such.txt' is not a readable"),
    (["--config.data.source=text", "--config.data.files=/"], "'/' is not a readable file"),
    (["--coordinator_address=127.0.0.1:1"], "missing: --num_processes, --process_id"),
])
def test_bad_input_fails_clearly_and_leaves_no_workdir(tmp_path, cache_dir, args, msg):
    r = run("train.py", f"--workdir={tmp_path / 'w'}", *args, cache_dir=cache_dir)
    assert r.returncode != 0 and msg in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "w").exists()


def _short_text(tmp_path):
    """Two documents of 200 lines: the held-out one has about 12 windows of 129 tokens, not a batch of 16."""
    f = tmp_path / "short.txt"
    f.write_text("".join(f"line {i} says little.\n" for i in range(400)))
    return f


def _binary(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(bytes(range(256)) * 64)
    return f


@pytest.mark.parametrize("args,files,msg,devices", [
    (["--config.train.lr=nan"], None, "train.lr=nan must be a finite number", 1),
    (["--config.train.b2=1.5"], None, "train.b2=1.5 is out of range: must be [0.0, 1.0]", 1),
    (["--config.model.vocab_size=100"], None, "model.vocab_size=100 is too small for the byte-level BPE", 1),
    (["--config.data.source=text"], _binary, "is not a text file (it has a NUL byte at offset 0)", 1),
    (["--config.data.source=text"], _short_text, "validation needs a batch of 16: add text", 1),
    ([], None, "not divisible by the 3 batch shards of mesh data=3, fsdp=1, tensor=1 (mesh axes ('data', 'fsdp')); "
               "use a batch size that is a multiple of 3 (15 or 18)", 3),
])
def test_preflight_refuses_before_any_work(tmp_path, cache_dir, args, files, msg, devices):
    """Checks that used to fail after training (or never) now fail before the workdir exists; a bad
    tokenizer size fails before a tokenizer or cache is built."""
    own_cache = tmp_path / "cache"
    extra = [f"--config.data.files={files(tmp_path)}", f"--config.data.cache_dir={own_cache}"] if files else []
    if "--config.model.vocab_size=100" in args:
        extra = [f"--config.data.cache_dir={own_cache}"]
    r = run("train.py", f"--workdir={tmp_path / 'w'}", "--config.train.steps=2", *args, *extra, cache_dir=cache_dir,
            devices=devices)
    assert r.returncode in (1, 2) and msg in r.stderr, r.stderr[-2000:]  # 2: a config error, before any run
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "w").exists()
    if files is not _short_text:
        assert not own_cache.exists() or not any(own_cache.iterdir())


def test_a_second_train_on_a_busy_workdir_is_refused_and_changes_nothing(tmp_path, cache_dir):
    from stem_jax import lock
    work = tmp_path / "w"
    fd = lock.acquire(work, "a run under test")  # the flock is per open file: a child process conflicts with it
    try:
        before = {f.name: f.read_bytes() for f in work.iterdir()}
        r = run("train.py", f"--workdir={work}", "--config.train.steps=2", cache_dir=cache_dir)
        holder = f"is in use by a run under test (pid {os.getpid()} on"
        assert r.returncode == 1 and holder in r.stderr, r.stderr[-2000:]
        assert {f.name: f.read_bytes() for f in work.iterdir()} == before
    finally:
        lock.release(fd)


def test_a_workdir_that_is_a_file_is_refused_and_kept(tmp_path, cache_dir):
    f = tmp_path / "notes.txt"
    f.write_text("my notes")
    r = run("train.py", f"--workdir={f}", "--config.train.steps=2", cache_dir=cache_dir)
    assert r.returncode == 1 and "is a file, not a directory" in r.stderr, r.stderr[-2000:]
    assert f.read_text() == "my notes"


def test_tokenizer_larger_than_model_vocab_is_rejected(tmp_path, cache_dir):
    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i} of a small corpus with numbers {i * 7919 % 1000}\n" for i in range(3000)))
    r = run("train.py", f"--workdir={tmp_path / 'w'}", "--config.data.source=text",
            f"--config.data.files={text}", "--config.data.tokenizer_vocab=600",
            "--config.model.vocab_size=300", cache_dir=cache_dir)
    assert r.returncode != 0
    assert "StoreError: data.tokenizer_vocab=600 is larger than model.vocab_size=300" in r.stderr, r.stderr[-2000:]


def test_eval_on_a_non_workdir_is_a_clear_error(tmp_path, cache_dir):
    r = run("eval.py", f"--workdir={tmp_path}", cache_dir=cache_dir)
    assert r.returncode != 0 and "is 'config.json' a" not in r.stderr
    assert "config.json not found" in r.stderr


# ---- the tools' command lines (cli.parse_command), in process ----

def _tool_exit(main, argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_tool_help_lists_every_flag_of_the_command(capsys):
    from stem_jax import editing, hf
    code, out, _ = _tool_exit(hf.main, ["--help"], capsys)
    assert code == 0 and all(c in out for c in ("export", "import", "to_stem"))
    code, out, _ = _tool_exit(editing.main, ["inject", "--help"], capsys)
    assert code == 0
    for flag in ("--workdir", "--out", "--source", "--target", "--mode", "--layers"):
        assert flag in out, out
    assert "--prompt" not in out  # an `edit` flag


def test_tool_command_line_errors_are_one_line(capsys):
    from stem_jax import analysis, editing, sampling
    for main, argv, msg in (
            (analysis.main, ["angulr"], "expected a command first, one of angular, activated"),
            (editing.main, ["inject", "--workdir", "w"], "--out must have a value"),
            (sampling.main, ["--workdir", "w", "--prompt", "a", "--top_k", "many"], "--top_k"),
            (sampling.main, ["--workdir", "w", "--prompt", "a", "stray"], "unexpected positional arguments"),
            (editing.main, ["edit", "--workdir", "w", "--prompt", "p", "--source", "s", "--target", "t",
                            "--mode", "sideways"], "--mode")):
        code, _, err = _tool_exit(main, argv, capsys)
        assert code == 2 and err.startswith("error:") and msg in err and err.count("\n") == 1, err


_COMPILE_ONE = """
import jax, jax.numpy as jnp
from absl import app
from stem_jax import cli
def main(argv):
    print(float(jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((64, 64))).sum()))
app.run(main, flags_parser=cli.parse_flags)
"""


def test_every_entry_point_keeps_compiled_programs_in_the_persistent_cache(tmp_path, capsys):
    """The compilation cache of ``cli.parse_flags`` (train.py, eval.py, aot, data_prep, experiments) and of
    ``cli.parse_command`` (the workdir tools): a rerun loads what the first run compiled, ``--compilation_cache``
    moves the folder or turns it off, and the exit line says which happened."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", STEM_JAX_CACHE=str(tmp_path / "cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # a tiny program is cached too
    env.pop("JAX_COMPILATION_CACHE_DIR", None)

    def run(*flags):
        r = subprocess.run([sys.executable, "-c", _COMPILE_ONE, *flags], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stderr.strip().splitlines()[-1]
    default = tmp_path / "cache" / "xla"
    first = re.match(rf"compilation cache {default}: 0 program\(s\) loaded from it .*, ([1-9]\d*) compiled "
                     rf"\(\1 written", run())
    assert first, "the first run compiles and writes every program"
    assert re.match(rf"compilation cache {default}: {first.group(1)} program\(s\) loaded from it .*, 0 compiled",
                    run())
    moved = tmp_path / "elsewhere"
    assert run(f"--compilation_cache={moved}").startswith(f"compilation cache {moved}: 0 program(s) loaded")
    assert list(moved.iterdir())
    assert run("--compilation_cache=none").startswith("compilation cache off")
    from stem_jax import cli  # the workdir tools' flags carry it too
    with pytest.raises(SystemExit):
        cli.parse_command(["--help"], "tool", "about", lambda fv, _: None)
    assert "--compilation_cache" in capsys.readouterr().out


_DIES_WITH_A_PENDING_COROUTINE = """
from stem_jax import cli
async def save():
    pass
pending = save()  # never awaited, as a failed background save's coroutine: Python warns when it is collected
def fail():
    raise ValueError("the run failed")
cli.run_user_errors(fail)
"""


def test_the_error_line_stays_the_last_line_of_a_failed_run():
    r = subprocess.run([sys.executable, "-c", _DIES_WITH_A_PENDING_COROUTINE], cwd=REPO, capture_output=True,
                       text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == ["error: ValueError: the run failed"], r.stderr
