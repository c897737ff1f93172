"""Row-swap editing equals a forward pass with the rows swapped in a copy of the params; every multi-token
mode; injection changes exactly the injected rows."""
import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stem_jax import editing, sharding, workdir as workdir_lib
from stem_jax.editor import EditError, Editor, entity_positions, format_comparison, inject, plan_rows
from stem_jax.sampling import SamplingConfig

@pytest.fixture(scope="module")
def editor(tiny_editor):
    return tiny_editor


def _logits(s, params, ids, edit=None):
    return np.asarray(nnx.merge(s.ctx.graphdef, params)(jnp.asarray([ids], jnp.int32), edit=edit))[0]


def _swapped(params, pairs, layers=(1, 2), vocab=1000):
    """A copy of params where, at each layer, token s's row := token t's for (s, tokens t) pairs."""
    p = jax.tree.map(lambda x: np.array(x), jax.device_get(params))
    row = lambda t: sharding.stored_rows(np.asarray(t), vocab)  # the tables' stored layout
    for layer in layers:
        table = p["blocks"][layer]["ffn"]["table"].get_value()
        src = table.copy()
        for s, ts in pairs:
            table[row(s)] = np.mean([src[row(t)] for t in ts], axis=0)
    return p


def test_entity_positions_use_the_last_occurrence(editor):
    ed, _, _ = editor
    tok = ed.tokenizer
    pos, ids = entity_positions(tok, "Spain is Spain", "Spain")
    enc = tok.encode("Spain is Spain")
    assert pos[0] > 0 and ids == [enc.ids[i] for i in pos]
    with pytest.raises(EditError, match="'Italy' does not occur"):
        entity_positions(tok, "The capital of Spain is", "Italy")
    with pytest.raises(EditError, match="empty"):
        entity_positions(tok, "The capital of Spain is", " ")


def test_one_to_one_edit_equals_swapped_rows_in_a_copy_of_the_params(editor):
    ed, s, params = editor
    prompt = "The capital of Spain is"
    e = ed.prepare(prompt, "Spain", "Germany", mode="auto")
    assert len(e.source_ids) == len(e.target_ids)  # auto picked one_to_one
    swapped = _swapped(params, [(a, [b]) for a, b in zip(e.source_ids, e.target_ids)])
    want = _logits(s, swapped, e.prompt_ids)
    np.testing.assert_allclose(_logits(s, params, e.prompt_ids, e.arrays()), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(_logits(s, params, e.prompt_ids), want, atol=1e-5)  # the edit does something
    # Only layer 2: the copy swaps rows at layer 2 alone.
    e2 = ed.prepare(prompt, "Spain", "Germany", mode="one_to_one", layers=[2])
    want2 = _logits(s, _swapped(params, [(a, [b]) for a, b in zip(e.source_ids, e.target_ids)], (2,)), e.prompt_ids)
    np.testing.assert_allclose(_logits(s, params, e.prompt_ids, e2.arrays()), want2, rtol=1e-5, atol=1e-5)


def test_last_position_edit_and_the_embedding_controls_equal_copies_of_the_params(editor):
    ed, s, params = editor
    tok = ed.tokenizer
    prompt = "The capital of Zorvania Quelmar is"
    e = ed.prepare(prompt, "Zorvania Quelmar", "Spain", positions="last")
    src = entity_positions(tok, prompt, "Zorvania Quelmar")
    assert len(src[0]) > 1 and e.source_positions == src[0][-1:] and e.source_ids == src[1][-1:]
    assert e.prompt_ids.count(src[1][-1]) == 1
    want = _logits(s, _swapped(params, [(src[1][-1], e.target_ids[-1:])]), e.prompt_ids)
    np.testing.assert_allclose(_logits(s, params, e.input_ids, e.arrays()), want, rtol=1e-5, atol=1e-5)

    prompt = "The capital of Spain is"
    both = ed.prepare(prompt, "Spain", "Germany", swap="stem+embedding")  # = the prompt about Germany
    assert both.input_ids == tok.encode("The capital of Germany is").ids != both.prompt_ids
    np.testing.assert_allclose(_logits(s, params, both.input_ids, both.arrays()), _logits(s, params, both.input_ids),
                               rtol=1e-5, atol=1e-5)
    emb = ed.prepare(prompt, "Spain", "Germany", swap="embedding")  # Germany's embedding, Spain's STEM rows
    assert emb.input_ids == both.input_ids and emb.input_ids.count(emb.target_ids[0]) == 1
    want = _logits(s, _swapped(params, [(emb.target_ids[0], emb.source_ids)]), emb.input_ids)
    np.testing.assert_allclose(_logits(s, params, emb.input_ids, emb.arrays()), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want, _logits(s, params, emb.input_ids), atol=1e-5)
    with pytest.raises(EditError, match="mode 'average' mixes several rows"):
        ed.prepare("The capital of Spain is", "Spain", "Zorvania Quelmar", mode="average", swap="embedding")
    with pytest.raises(EditError, match="unknown positions 'first'"):
        ed.prepare(prompt, "Spain", "Germany", positions="first")


def test_average_edit_equals_mean_rows_in_a_copy(editor):
    ed, s, params = editor
    prompt = "The capital of Spain is"
    e = ed.prepare(prompt, "Spain", "Zorvania Quelmar", mode="average")
    assert len(e.target_ids) >= 2
    swapped = _swapped(params, [(a, e.target_ids) for a in e.source_ids])
    np.testing.assert_allclose(_logits(s, params, e.prompt_ids, e.arrays()), _logits(s, swapped, e.prompt_ids),
                               rtol=1e-5, atol=1e-5)


def test_multi_token_modes():
    T = [7, 8]
    assert plan_rows(2, T, "auto", 0) == [[(7, 1.0)], [(8, 1.0)]]
    assert plan_rows(3, T, "auto", 0) == [[(7, 0.5), (8, 0.5)]] * 3
    assert plan_rows(3, T, "copy", 0) == [[(7, 1.0)], [(8, 1.0)], [(7, 1.0)]]
    assert plan_rows(3, T, "left_pad", 0) == [[(0, 1.0)], [(7, 1.0)], [(8, 1.0)]]
    assert plan_rows(3, T, "right_pad", 0) == [[(7, 1.0)], [(8, 1.0)], [(0, 1.0)]]
    assert plan_rows(1, T, "left_pad", 0) == [[(8, 1.0)]]   # a longer target is cut: left keeps the end
    assert plan_rows(1, T, "right_pad", 0) == [[(7, 1.0)]]
    with pytest.raises(EditError, match="one_to_one needs equal lengths"):
        plan_rows(3, T, "one_to_one", 0)
    with pytest.raises(EditError, match="unknown edit mode 'swap'"):
        plan_rows(1, T, "swap", 0)


def test_compare_leaves_the_weights_unchanged_and_reports_both_sides(editor):
    ed, s, params = editor
    before = jax.device_get(params)
    r = ed.compare("The capital of Spain is", "Spain", "Germany", k=3, sampling=SamplingConfig(max_new_tokens=4))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(ed.sampler.params), before)
    assert len(r["before"]["top_k"]) == 3 and r["before"]["top_k"] != r["after"]["top_k"]
    assert "before:" in format_comparison(r) and r["layers"] == [1, 2]
    with pytest.raises(EditError, match=r"layers \[0\] are not STEM layers"):
        ed.prepare("The capital of Spain is", "Spain", "Germany", layers=[0])
    with pytest.raises(EditError, match="no STEM layers"):
        Editor(ed.sampler, ())


def test_injection_changes_only_the_injected_rows(tmp_path, stem_workdir):
    work = stem_workdir  # STEM at layer 1 of 2
    out = tmp_path / "injected"
    report = inject(work, out, " lord", [" secret"], mode="copy")
    _, old, _ = workdir_lib.read_params(work)
    _, new, _ = workdir_lib.read_params(out)
    src, tgt = report["source_ids"], report["target_ids"][0]
    for key, a in old.items():
        if key[-1] != "table":
            np.testing.assert_array_equal(new[key], a, err_msg=str(key))
            continue
        diff = np.flatnonzero(np.any(new[key] != a, axis=1))
        assert diff.tolist() == sorted(set(src)), key
        np.testing.assert_array_equal(new[key][src[0]], a[tgt[0]])
    assert [(c["layer"], c["token_id"]) for c in report["changed_rows"]] == [(1, t) for t in sorted(set(src))]
    assert (out / "injection.json").is_file() and (out / "tokenizer.json").is_file()
    with pytest.raises(FileExistsError):
        inject(work, out, " lord", [" secret"])  # never over an existing workdir
    with pytest.raises(EditError, match="injection mode"):
        inject(work, tmp_path / "x", " lord", [" secret"], mode="swap")


def _main_exit(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        editing.main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_inject_refuses_an_out_inside_the_source_or_a_runs_checkpoints(tmp_path, stem_workdir, capsys):
    work = Path(stem_workdir)
    before = sorted((p.relative_to(work), p.stat().st_size, p.stat().st_mtime_ns) for p in work.rglob("*"))
    other = tmp_path / "other_run"  # another run's checkpoints folder
    (other / "checkpoints").mkdir(parents=True)
    (other / "config.json").write_text("{}")
    edits = tmp_path / "edits.jsonl"
    edits.write_text('{"source": " lord", "target": " secret"}\n')
    refused = [(work, f"is inside the source workdir {work}"), (work / "new", f"is inside the source workdir {work}"),
               (work / "checkpoints" / "99", f"is inside the source workdir {work}"),
               (work.parent, f"contains the source workdir {work}"),
               (other / "checkpoints" / "99", f"is inside the checkpoints folder of the run {other}")]
    for out, why in refused:
        for given in (["--source", " lord", "--target", " secret"], ["--edits", edits]):
            code, stdout, err = _main_exit(["inject", "--workdir", work, "--out", out, *given], capsys)
            assert (code, stdout, err) == (1, "", f"error: EditError: --out {out} {why}; give a new folder outside it\n")
        with pytest.raises(EditError, match=re.escape(f"--out {out} {why}; ")):
            inject(work, out, " lord", [" secret"])
    assert not (other / "checkpoints" / "99").exists() and sorted(os.listdir(other)) == ["checkpoints", "config.json"]
    after = sorted((p.relative_to(work), p.stat().st_size, p.stat().st_mtime_ns) for p in work.rglob("*"))
    assert after == before  # nothing was written into the source run


# In the fixture's tokenizer " thee" is the shared pieces ' the' + 'e'; " lord" and " secret" are one token each.
def test_inject_refuses_a_multi_token_source_without_the_flag(tmp_path, stem_workdir, capsys):
    out = tmp_path / "injected"
    code, stdout, err = _main_exit(["inject", "--workdir", stem_workdir, "--out", out, "--source", " thee",
                                    "--target", " secret"], capsys)
    assert code == 1 and err.startswith("error: EditError:") and err.count("\n") == 1, err
    assert "[' the', 'e']" in err and "--allow_shared_rows" in err and "every word" in err, err
    assert "source ' thee' -> 2 tokens [' the', 'e']" in stdout and "target ' secret' -> 1 token [' secret']" in stdout
    assert not out.exists()
    with pytest.raises(EditError, match="allow_shared_rows"):
        inject(stem_workdir, out, " thee", [" secret"])


def test_inject_with_allow_shared_rows_lists_every_changed_row(tmp_path, stem_workdir, capsys):
    out = tmp_path / "injected"
    editing.main(["inject", "--workdir", str(stem_workdir), "--out", str(out), "--source", " thee",
                  "--target", " lordship", "--allow_shared_rows"])
    stdout = capsys.readouterr().out
    report = json.loads((out / "injection.json").read_text())
    rows = report["changed_rows"]
    assert {c["token_id"] for c in rows} == set(report["source_ids"]) and len(rows) == 2  # 2 tokens x 1 layer
    assert report["source_tokens"] == [" the", "e"] and report["allow_shared_rows"]
    assert "2 rows changed (2 tokens)" in stdout, stdout
    table = stdout.split("changed rows (token, id, STEM layers):\n")[1].splitlines()
    assert len(table) == 2, stdout
    for c in rows:
        assert any(repr(c["token"]) in line and f"id {c['token_id']} " in line and "layers [1]" in line
                   for line in table), (c, stdout)


def test_edit_prints_the_pieces_and_notes_shared_rows_before_restoring(stem_workdir, capsys):
    # A bad --mesh fails in the restore: the pieces were printed before it, and --mesh reached it.
    code, stdout, err = _main_exit(["edit", "--workdir", stem_workdir, "--prompt", "and thee lord", "--source",
                                    "thee", "--target", "lord", "--mesh", "two,1,1"], capsys)
    assert code == 1 and "--mesh=two,1,1" in err and err.count("\n") == 1, err
    lines = stdout.splitlines()
    assert lines[0] == "source 'thee' -> 2 tokens [' the', 'e'] (in the prompt)", stdout
    assert lines[1] == "target 'lord' -> 1 token [' lord']", stdout
    assert lines[2].startswith("note: the source is 2 pieces") and "--allow_shared_rows" in lines[2], stdout


def test_edit_and_sample_clis(tmp_path, cache_dir, stem_workdir):
    from conftest import run_script
    work = stem_workdir
    r = run_script("stem_jax/editing.py", "edit", "--workdir", work, "--prompt", "the lord shall be with them",
                   "--source", "lord", "--target", "secret", "--k", "3", "--max_new_tokens", "4",
                   "--json", tmp_path / "edit.json", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rank" in r.stdout and "after:" in r.stdout
    assert "source 'lord' -> 1 token [' lord'] (in the prompt)" in r.stdout and "note:" not in r.stdout
    assert json.loads((tmp_path / "edit.json").read_text())["target"] == "secret"
    r = run_script("stem_jax/sampling.py", "--workdir", work, "--prompt", "the lord", "--prompt", "thou",
                   "--max_new_tokens", "3", "--show_topk", "2", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("next:") == 2
    r = run_script("stem_jax/sampling.py", "--workdir", work, "--prompt", "x", "--top_p", "0", cache_dir=cache_dir)
    assert r.returncode == 1 and "top_p=0.0 must be in (0, 1]" in r.stderr and "Traceback" not in r.stderr
