"""lm-evaluation-harness on our model, offline: its acc equals tasks.py's on the same JSONL."""
import functools
import json
import os
import sys
import tempfile

import pytest

# Before datasets is imported: no hub access, and a throwaway cache.
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=tempfile.mkdtemp(prefix="hf_home_"))
lm_eval = pytest.importorskip("lm_eval")

from test_evaluate import DATA, make_workdir  # noqa: E402
from stem_jax import tasks  # noqa: E402

TASKS_YAML = {
    "tiny_mc": """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
""",
    "tiny_gen": """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 3
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
""",
    "tiny_ppl": """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{question}}}}"
metric_list:
  - metric: word_perplexity
metadata:
  version: 1.0
""",
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cache_dir):
    work, _ = make_workdir(tmp_path_factory.mktemp("lm_eval_work"), cache_dir)
    return work


# The same questions under the other prompt conventions eval.py supports: a cloze prompt, and choices that
# already start with a space under target_delimiter "" (lm-eval's spelling; tasks.load_jsonl's too).
# name: (doc_to_text, data file, extra YAML, tasks.load_jsonl arguments)
VARIANTS = {"tiny_mc_cloze": ("{{{{question}}}}", "tiny_mc.jsonl", "", dict(template="cloze")),
            "tiny_mc_spaced": (None, "spaced.jsonl", 'target_delimiter: ""\n', dict(target_delimiter=""))}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    (d / "tiny_mc.jsonl").write_text((DATA / "tiny_mc.jsonl").read_text())
    rows = [json.loads(x) for x in (DATA / "tiny_mc.jsonl").read_text().splitlines() if x.strip()]
    (d / "spaced.jsonl").write_text("".join(json.dumps({**x, "choices": [" " + c for c in x["choices"]]}) + "\n"
                                            for x in rows))
    for name, text in TASKS_YAML.items():
        (d / f"{name}.yaml").write_text(text.format(data=DATA / "tiny_mc.jsonl"))
    qa = "Question: {{{{question}}}}\\nAnswer:"
    for name, (prompt, data, extra, _) in VARIANTS.items():
        text = TASKS_YAML["tiny_mc"].replace("task: tiny_mc", f"task: {name}").replace(qa, prompt or qa) + extra
        (d / f"{name}.yaml").write_text(text.format(data=d / data))
    return d


def test_rolling_windows_match_lm_eval():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class Fake:
        seq_len, eot_id = 8, 0
    from stem_jax.scoring import Scorer
    for n in (1, 5, 8, 9, 17, 30):
        ids = list(range(1, n + 1))
        want = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, 0, 8, 1)]
        assert Scorer.rolling_windows(Fake(), ids) == want


def test_simple_evaluate_offline_matches_our_tasks(workdir, task_dir):
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager
    from stem_jax.lm_eval_model import StemJaxLM
    assert get_model("stem_jax") is StemJaxLM
    lm = StemJaxLM.create_from_arg_string(f"workdir={workdir},batch_size=8", {"batch_size": 1, "device": None})
    assert lm.scorer.eval_batch == 8 and lm.scorer.step == 1
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_gen", "tiny_ppl", *VARIANTS], task_manager=tm,
                                  log_samples=True)
    res = out["results"]
    assert out["config"]["batch_sizes"] == [8]
    for name, data, kwargs in [("tiny_mc", DATA / "tiny_mc.jsonl", {}),
                               *[(n, task_dir / d, kw) for n, (_, d, _, kw) in VARIANTS.items()]]:
        examples = tasks.load_jsonl(data, **kwargs)
        theirs = sorted(out["samples"][name], key=lambda x: x["doc_id"])
        assert [[tuple(r) for r in x["arguments"]] for x in theirs] == [e.pairs() for e in examples], name
        ours = tasks.score_mc(lm.scorer.loglikelihood, examples)
        assert res[name]["acc,none"] == pytest.approx(ours["acc"])
        assert res[name]["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    assert 0 <= res["tiny_gen"]["exact_match,none"] <= 1
    sample = out["samples"]["tiny_ppl"][0]
    text = sample["arguments"][0][0] if isinstance(sample["arguments"][0], (list, tuple)) else sample["arguments"][0]
    assert sample["resps"][0][0] == pytest.approx(lm.scorer.loglikelihood_rolling([text])[0], rel=1e-5)
    gen = out["samples"]["tiny_gen"][0]
    prompt = gen["arguments"][0][0]
    assert gen["resps"][0][0] == lm.scorer.generate_until([prompt], ["\n"], 3)[0]


def test_cli_wrapper_registers_the_model(tmp_path, workdir, task_dir, monkeypatch, capsys):
    import lm_eval.tasks
    from stem_jax import lm_eval_model
    # The CLI indexes lm-eval's thousands of built-in task files (about 20 s here); this test runs only its own.
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager,
                                                                        include_defaults=False))
    monkeypatch.setattr(sys, "argv", ["lm_eval", "run", "--model", "stem_jax", "--model_args",
                                      f"workdir={workdir},batch_size=8", "--include_path", str(task_dir),
                                      "--tasks", "tiny_mc", "--output_path", str(tmp_path / "out")])
    lm_eval_model.main()
    printed = capsys.readouterr().out
    assert "tiny_mc" in printed and "acc_norm" in printed
    assert "batch_size: 8" in printed  # model_args' batch size is the one used, not the CLI's default of 1
    assert list((tmp_path / "out").rglob("results_*.json"))
