"""Multiple-choice loading and metrics, TFDS task readers, and the needle-in-a-haystack generator."""
import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from stem_jax import tasks
from stem_jax.tasks import MCExample, TaskError

DATA = Path(__file__).parent / "data"


def test_jsonl_fixture_loads_with_lm_eval_prompt():
    ex = tasks.load_jsonl(DATA / "tiny_mc.jsonl")
    assert len(ex) == 6 and ex[0].label == 0 and ex[2].choices == ("carrot", "potato", "apple")
    assert ex[0].pairs()[1] == ("Question: What color is the clear daytime sky?\nAnswer:", " green")
    assert len(tasks.load_jsonl(DATA / "tiny_mc.jsonl", limit=2)) == 2


@pytest.mark.parametrize("line,msg", [
    ('{"question": "q", "choices": ["a", "b"], "label": 0', "invalid JSON"),
    ('{"question": "q", "choices": ["a", "b"]}', "missing key(s) ['label']"),
    ('{"question": "q", "choices": ["a", "b"], "label": 2}', "'label' 2 is not an index into the 2 choices"),
    ('{"question": "q", "choices": ["a", "b"], "label": -1}', "'label' -1 is not an index"),
    ('{"question": "q", "choices": [], "label": 0}', "'choices' is empty"),
    ('{"question": "q", "choices": "ab", "label": 0}', "'choices' must be a list"),
    ('["q", ["a"], 0]', "expected a JSON object"),
    ('{"question": "q", "choices": [" a", "b"], "label": 0}', "choice ' a' starts with whitespace and target_del"),
    ('{"question": "q", "choices": ["a"], "label": 0, "template": "Q: {q}"}', "'Q: {q}' has no {question} place"),
    ('{"question": "q", "choices": ["a"], "label": 0, "template": ["qa"]}', "has no {question} placeholder"),
    ('{"question": "q", "choices": ["a"], "label": 0, "target_delimiter": 1}', "'target_delimiter' must be a str"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, msg):
    good = '{"question": "q", "choices": ["a", "b"], "label": 1}'
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n")  # the blank line still counts: the bad one is line 4
    with pytest.raises(TaskError) as e:
        tasks.load_jsonl(path)
    assert f"{path}:4: " in str(e.value) and msg in str(e.value)


def test_a_line_that_is_not_utf8_names_file_and_line(tmp_path):
    good = b'{"question": "q", "choices": ["a", "b"], "label": 1}'
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b'\n{"question": "\xff", "choices": ["a"], "label": 0}\n')
    with pytest.raises(TaskError) as e:
        tasks.load_jsonl(path)
    assert str(e.value) == f"{path}:2: not UTF-8 text (byte 0xff at column 15); save the file as UTF-8"


def test_templates_and_target_delimiter_per_file_and_per_line(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [{"question": "Paris is in", "choices": [" France", " Spain"], "label": 0},
             {"question": "Rome?", "choices": ["Italy"], "label": 0, "template": "qa", "target_delimiter": " -> "},
             {"question": "x", "choices": ["y"], "label": 0, "template": "[{question}] {question}."}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ex = tasks.load_jsonl(path, template="cloze", target_delimiter="")
    assert [e.pairs() for e in ex] == [[("Paris is in", " France"), ("Paris is in", " Spain")],
                                       [("Question: Rome?\nAnswer:", " -> Italy")], [("[x] x.", "y")]]
    with pytest.raises(TaskError, match=f"^{path}:1: choice ' France' starts with whitespace"):
        tasks.load_jsonl(path, template="cloze")  # the default delimiter " " would double the space
    with pytest.raises(TaskError, match=f"^{path}: template 'Q:' has no {{question}} placeholder"):
        tasks.load_jsonl(path, template="Q:")  # before any line is read


def test_acc_and_acc_norm_by_hand():
    examples = [MCExample("c", ("a", "bbbb"), 1),          # acc: -3 > -4 -> 0 wrong; norm: -4/1 < -3/4 -> 1 right
                MCExample("c", ("xx", "y", "zzz"), 0),     # acc: 0 right; norm: -2/2=-1, -2.5, -1.2 -> 0 right
                MCExample("c", ("p", "q"), 1)]             # a tie goes to the first choice: wrong both ways
    lls = [[-4.0, -3.0], [-2.0, -2.5, -3.6], [-1.0, -1.0]]
    got = tasks.mc_metrics(examples, lls)
    assert got["acc"] == pytest.approx(2 / 3) and got["acc_norm"] == pytest.approx(2 / 3)
    assert got["n"] == 3 and got["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    # score_mc sends one request per choice, with the leading space, in order
    table = {("c", " a"): -4.0, ("c", " bbbb"): -3.0, ("c", " xx"): -2.0, ("c", " y"): -2.5,
             ("c", " zzz"): -3.6, ("c", " p"): -1.0, ("c", " q"): -1.0}
    assert tasks.score_mc(lambda pairs: [(table[p], False) for p in pairs], examples) == got


def test_missing_tfds_data_is_a_clear_error(tmp_path):
    with pytest.raises(TaskError) as e:
        tasks.load_tfds("ai2_arc/ARC-Easy", tmp_path / "tfds")
    msg = str(e.value)
    assert f"no prepared data at {tmp_path / 'tfds' / 'ai2_arc' / 'ARC-Easy' / '1.0.0'}" in msg
    assert "does not download" in msg and "copy" in msg and "--tfds_data_dir" in msg
    with pytest.raises(TaskError, match="unknown TFDS task 'arc'"):
        tasks.load_tfds("arc", tmp_path)


def _raw_files(raw: Path) -> None:
    """The files each builder would download, in their archives' layout, two labeled rows per split."""
    def write(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for cfg in ("ARC-Easy", "ARC-Challenge"):
        for split in ("Train", "Dev", "Test"):
            write(raw / "ARC-V1-Feb2018-2" / cfg / f"{cfg}-{split}.jsonl", [
                {"id": f"a{i}", "answerKey": "3" if i else "B", "question": {"stem": f"arc {i}?", "choices": [
                    {"text": f"arc {i} {c}", "label": c} for c in ("1234" if i else "ABCD")]}} for i in range(2)])
    for split in ("train", "dev", "test"):
        write(raw / "OpenBookQA-V1-Sep2018" / "Data" / "Additional" / f"{split}_complete.jsonl", [
            {"id": f"o{i}", "question": {"stem": f"obqa {i}", "choices": [{"text": f"o{c}"} for c in "ABCD"]},
             "fact1": "f", "humanScore": 1.0, "clarity": 1.0, "turkIdAnonymized": "t", "answerKey": "ABCD"[i]}
            for i in range(2)])
    for split in ("train", "dev"):
        write(raw / "physicaliqa-train-dev" / f"{split}.jsonl",
              [{"id": f"p{i}", "goal": f"piqa {i}", "sol1": "s1", "sol2": "s2"} for i in range(2)])
        write(raw / "physicaliqa-train-dev" / f"{split}-labels.lst", [0, 1])
    for split in ("train", "val", "test"):
        write(raw / f"hellaswag_{split}.jsonl", [
            {"ctx": f"hs {i} starts [title] here", "endings": [f"e{j} [step]" for j in range(4)],
             "activity_label": "Act", "label": i, "split_type": "indomain" if i < 2 else "zeroshot",
             "source_id": "wikihow~1" if i % 2 else "activitynet~1"}
            for i in range(4)])  # every (domain, source) split of the builder gets a row
    for split in ("train", "dev"):
        write(raw / f"{split}.jsonl", [{"question": f"boolq {i}", "passage": "P", "answer": bool(i), "title": "t"}
                                       for i in range(2)])
    for split in ("train_xs", "train_s", "train_m", "train_l", "train_xl", "dev", "test"):
        write(raw / "winogrande_1.1" / f"{split}.jsonl", [
            {"qID": f"w{i}", "sentence": f"Ann thanked Bo because _ helped {i}.", "option1": "Ann",
             "option2": "Bo", "answer": "12"[i]} for i in range(2)])


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """Every task prepared as array_record from fake raw files: downloads are redirected to local files."""
    import tensorflow_datasets as tfds
    import tensorflow_datasets.text  # noqa: F401
    root = tmp_path_factory.mktemp("tfds")
    raw, data_dir = root / "raw", root / "data"
    _raw_files(raw)

    def fake_download(self, urls):
        from etils import epath
        if isinstance(urls, dict):
            return {k: epath.Path(raw / os.path.basename(v)) for k, v in urls.items()}
        return epath.Path(raw)
    # code_path needs the importlib_resources backport, which only matters for builder metadata
    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract", fake_download), \
            mock.patch.object(tfds.download.DownloadManager, "download", fake_download), \
            mock.patch.object(tfds.core.DatasetBuilder, "code_path", None):
        for task in tasks.TFDS_TASKS.values():
            tfds.builder(task.builder, data_dir=str(data_dir)).download_and_prepare(
                file_format="array_record",
                download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return data_dir


def _by(examples, key):
    return {key(ex): ex for ex in examples}


def test_tfds_tasks_map_features_like_lm_eval(tfds_dir):
    arc = _by(tasks.load_tfds("ai2_arc/ARC-Challenge", tfds_dir), lambda ex: ex.context)
    assert arc["Question: arc 0?\nAnswer:"].label == 1 and arc["Question: arc 1?\nAnswer:"].label == 2  # "B", "3"
    assert arc["Question: arc 0?\nAnswer:"].choices == tuple(f"arc 0 {c}" for c in "ABCD")
    obqa = _by(tasks.load_tfds("openbookqa", tfds_dir), lambda ex: ex.context)
    assert obqa["obqa 1"].label == 1 and obqa["obqa 1"].choices == ("oA", "oB", "oC", "oD")
    piqa = _by(tasks.load_tfds("piqa", tfds_dir), lambda ex: ex.context)
    assert piqa["Question: piqa 1\nAnswer:"].label == 1 and piqa["Question: piqa 0\nAnswer:"].choices == ("s1", "s2")
    hs = _by(tasks.load_tfds("hellaswag", tfds_dir), lambda ex: ex.context)
    assert hs["Act: hs 3 starts. here"].label == 3 and hs["Act: hs 1 starts. here"].choices[0] == "e0 "  # as lm-eval: strip, then cut brackets
    bq = _by(tasks.load_tfds("bool_q", tfds_dir), lambda ex: ex.context)
    assert bq["P\nQuestion: boolq 1?\nAnswer:"].label == 1 and bq["P\nQuestion: boolq 0?\nAnswer:"].label == 0
    wg = _by(tasks.load_tfds("winogrande", tfds_dir), lambda ex: ex.choices[0])
    assert wg["helped 1."].label == 1 and wg["helped 0."].label == 0
    assert wg["helped 1."].pairs() == [("Ann thanked Bo because Ann", " helped 1."),
                                       ("Ann thanked Bo because Bo", " helped 1.")]
    assert len(tasks.load_tfds("piqa", tfds_dir, limit=1)) == 1


def test_needles_sit_at_the_requested_depth_and_fit():
    hay = np.arange(100, 400)
    encode = lambda text: [ord(c) % 50 + 1000 for c in text]  # one token per character, ids unlike the hay
    lengths, depths = [120, 160], [0.0, 0.25, 1.0]
    examples = tasks.needle_examples(hay, encode, lengths, depths, samples=2, n_candidates=5, seed=1,
                                     skip_ids=[150])
    assert len(examples) == 2 * 3 * 2
    question = encode(tasks.QUESTION)
    for ex in examples:
        needle = encode(tasks.NEEDLE.format(number=ex.number))
        longest = max(map(len, ex.candidate_ids))
        assert len(ex.context_ids) + longest == ex.length  # the bucket is filled exactly
        n_hay = len(ex.context_ids) - len(needle) - len(question)
        assert ex.needle_at == round(ex.depth * n_hay)
        assert ex.context_ids[ex.needle_at:ex.needle_at + len(needle)] == needle
        assert ex.context_ids[-len(question):] == question
        assert 150 not in ex.context_ids
        assert ex.candidate_ids[0] == encode(f" {ex.number}") and len(set(map(tuple, ex.candidate_ids))) == 5
    assert {ex.needle_at for ex in examples if ex.depth == 0.0} == {0}
    with pytest.raises(ValueError, match="leaves no room"):
        tasks.needle_examples(hay, encode, [40], [0.5])


def test_needle_scoring_ranks_the_true_number():
    ex = tasks.NeedleExample([1, 2], [[7], [8], [9]], length=4, depth=0.5, needle_at=1, number=7)
    lls = {7: -1.0, 8: -2.0, 9: -0.5}
    got = tasks.score_needles(lambda reqs: [(lls[c[0]], False) for _, c in reqs], [ex, ex])
    assert got["acc"] == 0.0 and got["chance"] == pytest.approx(1 / 3)
    lls[9] = -3.0
    got = tasks.score_needles(lambda reqs: [(lls[c[0]], False) for _, c in reqs], [ex])
    assert got == {"acc": 1.0, "n": 1, "chance": pytest.approx(1 / 3), "by_length": {"4": 1.0},
                   "by_length_depth": {"4": {"0.5": 1.0}}}
