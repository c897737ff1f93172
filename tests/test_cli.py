"""train.py / eval.py end to end, as a user runs them (one CPU device per subprocess)."""
import json
import math

import pytest

from conftest import run_script
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
    (["--config.data.source=text", "--config.data.text_files=/no/such.txt"], "'/no/such.txt' is not a readable"),
    (["--config.data.source=text", "--config.data.text_files=/"], "'/' is not a readable file"),
    (["--coordinator_address=127.0.0.1:1"], "missing: --num_processes, --process_id"),
])
def test_bad_input_fails_clearly_and_leaves_no_workdir(tmp_path, cache_dir, args, msg):
    r = run("train.py", f"--workdir={tmp_path / 'w'}", *args, cache_dir=cache_dir)
    assert r.returncode != 0 and msg in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "w").exists()


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
            f"--config.data.text_files={text}", "--config.data.tokenizer_vocab=600",
            "--config.model.vocab_size=300", cache_dir=cache_dir)
    assert r.returncode != 0
    assert "TokenIdError" in r.stderr and "model.vocab_size=300" in r.stderr, r.stderr[-2000:]


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
