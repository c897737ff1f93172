"""Many edits in one call: the JSONL reader's errors, a batch equal to the same edits one by one, atomic
injection of swaps with conflicts refused, and the ``--edits`` command lines."""
import json

import numpy as np
import pytest

from stem_jax import edit_batch, editing, workdir as workdir_lib
from stem_jax.edit_batch import EditRequest, inject_edits, read_edits, run_edits
from stem_jax.editor import EditError
from stem_jax.sampling import SamplingConfig


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"prompt": "p s", "source": "s", "target": "t"}


@pytest.mark.parametrize("line,msg", [
    ('{"prompt": "p s", "source": "s"', "invalid JSON"),
    ('["p", "s", "t"]', "expected a JSON object, got list"),
    ('{"prompt": "p s", "source": "s"}', "missing key(s) ['target']"),
    ('{"prompt": "p s", "source": "s", "target": "t", "taget": "u"}', "unknown key(s) ['taget']"),
    ('{"prompt": "p s", "source": "s", "target": " "}', "'target' must be a non-empty string"),
    ('{"prompt": "p s", "source": 3, "target": "t"}', "'source' must be a non-empty string"),
])
def test_a_malformed_line_is_named_by_file_and_line(tmp_path, line, msg):
    path = _jsonl(tmp_path / "e.jsonl", [GOOD, "", line])
    with pytest.raises(EditError) as e:
        read_edits(path)
    assert str(e.value).startswith(f"{path}:3: ") and msg in str(e.value), str(e.value)


def test_a_line_that_is_not_utf8_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n\n{"prompt": "caf\xe9 s", "source": "s", "target": "t"}\n')
    with pytest.raises(EditError) as e:
        read_edits(path)
    assert str(e.value) == f"{path}:3: not UTF-8 text (byte 0xe9 at column 16); save the file as UTF-8"


def test_reader_file_errors_and_prompts_optional_for_injection(tmp_path):
    with pytest.raises(EditError, match="no such edits file"):
        read_edits(tmp_path / "none.jsonl")
    with pytest.raises(EditError, match="no edits"):
        read_edits(_jsonl(tmp_path / "blank.jsonl", [""]))
    path = _jsonl(tmp_path / "e.jsonl", [{"source": " a", "target": " b"}])
    assert read_edits(path, need_prompt=False) == [EditRequest(" a", " b", where=f"{path}:1")]
    with pytest.raises(EditError, match="missing key"):
        read_edits(path)


def test_a_batch_equals_the_same_edits_one_by_one(tiny_editor, monkeypatch):
    ed, _, _ = tiny_editor
    tok, prompt = ed.tokenizer, "The capital of Spain is"
    reqs = [EditRequest("Spain", "Germany", prompt, "Madrid", "a:1"), EditRequest("Spain", "France", prompt, "Paris",
            "a:2"), EditRequest("Paris", "Zorvania Quelmar", "Tiberon Paris", None, "a:3")]
    one = [ed.compare(r.prompt, r.source, r.target, "auto", None, 3, SamplingConfig(max_new_tokens=0)) for r in reqs]
    r = run_edits(ed, reqs, k=3)
    for got, want in zip(r["edits"], one):
        for side in ("before", "after"):
            assert [t for t, _ in got[side]] == [t for t, _ in want[side]["top_k"]]
            np.testing.assert_allclose([p for _, p in got[side]], [p for _, p in want[side]["top_k"]], rtol=1e-5)
        assert got["source_tokens"] == want["source_tokens"] and got["target_tokens"] == want["target_tokens"]
    madrid = tok.encode(prompt + " Madrid").ids[-1]
    assert edit_batch.expected_id(tok, prompt, "Madrid") == madrid  # a space goes in front
    assert r["edits"][0]["expect_token"] == " Madrid" and r["with_expect"] == 2 and "hit" not in r["edits"][2]

    # The untrained model answers nothing sensible, so let every edited forward answer " Madrid".
    real = ed.sampler.next_token_logits

    def answers_madrid(ids, edit=None):
        logits = np.array(real(ids, edit))
        if edit is not None:
            logits[madrid] = logits.max() + 10
        return logits
    monkeypatch.setattr(ed.sampler, "next_token_logits", answers_madrid)
    r = run_edits(ed, reqs, k=3)
    assert [(x.get("hit"), x.get("hit_before")) for x in r["edits"]] == [(True, False), (False, False), (None, None)]
    assert r["success"] == 0.5
    table = edit_batch.format_edit_table(r)
    assert len(table.splitlines()) == 5 and "edit success 1/2 (50.0%)" in table, table
    bad = [reqs[0], EditRequest("Italy", "Spain", prompt, where="a:9")]
    with pytest.raises(EditError, match="^a:9: 'Italy' does not occur"):
        run_edits(ed, bad)


def _table(work, token_id, layer=1):
    return workdir_lib.read_params(work)[1][("blocks", layer, "ffn", "table")][token_id]


def test_injection_applies_swaps_from_the_original_rows_and_refuses_conflicts(tmp_path, stem_workdir):
    tok = workdir_lib.load_tokenizer(stem_workdir)
    lord, secret = tok.encode(" lord").ids[0], tok.encode(" secret").ids[0]
    swap = _jsonl(tmp_path / "swap.jsonl", [{"source": " lord", "target": " secret"},
                                            {"prompt": "the secret is", "source": "secret", "target": "lord"},
                                            {"source": " lord", "target": " secret"}])  # a repeat: the same rows
    out = tmp_path / "swapped"
    r = inject_edits(stem_workdir, out, read_edits(swap, need_prompt=False))
    np.testing.assert_array_equal(_table(out, lord), _table(stem_workdir, secret))
    np.testing.assert_array_equal(_table(out, secret), _table(stem_workdir, lord))
    assert sorted({c["token_id"] for c in r["changed_rows"]}) == sorted([lord, secret]) and len(r["edits"]) == 3

    clash = _jsonl(tmp_path / "clash.jsonl", [{"source": " lord", "target": " secret"}, {"source": " thou",
                                              "target": " lord"}, {"source": " lord", "target": " thou"}])
    with pytest.raises(EditError, match=f"^{clash}:3: conflicts with {clash}:1: both write token ' lord'"):
        inject_edits(stem_workdir, tmp_path / "never", read_edits(clash, need_prompt=False))
    shared = _jsonl(tmp_path / "shared.jsonl", [{"source": " thee", "target": " lord"}])
    with pytest.raises(EditError, match=f"^{shared}:1: source ' thee' splits into 2 tokens"):
        inject_edits(stem_workdir, tmp_path / "never", read_edits(shared, need_prompt=False))
    assert not (tmp_path / "never").exists()


def _main(argv, capsys):
    try:
        editing.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_edit_and_inject_clis_take_a_jsonl_file(tmp_path, stem_workdir, capsys):
    edits = _jsonl(tmp_path / "e.jsonl", [{"prompt": "the lord shall be", "source": "lord", "target": "secret",
                                           "expect": "be"},
                                          {"prompt": "and thou", "source": "thou", "target": "lord"}])
    code, out, err = _main(["edit", "--workdir", stem_workdir, "--edits", edits, "--k", "2",
                            "--json", tmp_path / "r.json"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["n"] == 2 and r["with_expect"] == 1 and r["edits"][1]["where"] == f"{edits}:2"
    assert r["edits"][0]["hit"] == (r["edits"][0]["after"][0][0] == r["edits"][0]["expect_token"])
    assert len(out.strip().splitlines()) == 4 and "edit success" in out, out

    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "the lord", "source": "lord", "target": "secret"},
                                          {"prompt": "the lord", "source": "king", "target": "secret"}])
    code, out, err = _main(["edit", "--workdir", stem_workdir, "--edits", bad, "--json", tmp_path / "no.json"], capsys)
    assert code == 1 and err.startswith(f"error: EditError: {bad}:2: 'king' does not occur") and err.count("\n") == 1
    assert not (tmp_path / "no.json").exists()
    code, _, err = _main(["edit", "--workdir", stem_workdir, "--edits", edits, "--prompt", "x"], capsys)
    assert code == 2 and "--edits replaces --prompt" in err, err

    out_dir = tmp_path / "injected"
    code, out, err = _main(["inject", "--workdir", stem_workdir, "--out", out_dir, "--edits", edits], capsys)
    assert code == 0, err
    assert "injected 2 edits (copy): 2 rows changed (2 tokens)" in out, out
    assert len(json.loads((out_dir / "injection.json").read_text())["edits"]) == 2
