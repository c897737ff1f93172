"""Multiple-choice tasks (local JSONL, or the TFDS builders of the paper's suite) scored as lm-eval does,
and a synthetic needle-in-a-haystack task.

Multiple choice: every choice is a continuation ``target_delimiter + choice`` of the example's context (lm-eval's
convention: the delimiter defaults to one space, and a task whose choices already start with a space sets it to
``""``); ``acc`` takes the argmax of the summed log-probability, ``acc_norm`` the argmax of the log-probability divided by the choice's
length in characters (lm-eval's ``acc_norm``; ties go to the first choice, as ``np.argmax``).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from stem_jax.sources import json_objects

LogLikelihood = Callable[[list[tuple[str, str]]], list[tuple[float, bool]]]


class TaskError(ValueError):
    """A task file or dataset that cannot be read."""


@dataclasses.dataclass(frozen=True)
class MCExample:
    """One question. ``context`` is the prompt every choice continues; ``contexts``, when set, gives one
    context per choice instead (WinoGrande: the blank filled with each option, scoring the same ending)."""
    context: str
    choices: tuple[str, ...]
    label: int
    contexts: tuple[str, ...] | None = None
    delimiter: str = " "

    def pairs(self) -> list[tuple[str, str]]:
        """(context, continuation) requests, one per choice."""
        contexts = self.contexts or (self.context,) * len(self.choices)
        return [(c, self.delimiter + choice) for c, choice in zip(contexts, self.choices)]


# The JSONL tasks' prompt templates by name; any other template is a string holding ``{question}``.
TEMPLATES = {"qa": "Question: {question}\nAnswer:", "cloze": "{question}"}


def question_prompt(question: str, template: str = "qa") -> str:
    """``template`` (a name in TEMPLATES or a string holding ``{question}``) filled with ``question``. ``qa`` is
    the prompt of ARC and PIQA in lm-eval."""
    text = TEMPLATES.get(template, template) if isinstance(template, str) else template
    if not isinstance(text, str) or "{question}" not in text:
        raise TaskError(f"template {template!r} has no {{question}} placeholder (or use one of {sorted(TEMPLATES)})")
    return text.replace("{question}", question)


# -- local JSONL ----------------------------------------------------------------------------------------

def load_jsonl(path: str | Path, limit: int | None = None, template: str = "qa",
               target_delimiter: str = " ") -> list[MCExample]:
    """One JSON object per line with ``question`` (str), ``choices`` (non-empty list of str) and ``label``
    (int index into choices), and optionally ``template`` and ``target_delimiter`` that override the file's
    (the arguments) for that line; blank lines are skipped. Errors name the file and line.

    A choice that starts with whitespace under a delimiter that ends with it is refused rather than scored
    with two spaces: set the delimiter to ``""``, as lm-eval task files do for such choices."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such task file")
    try:
        question_prompt("", template)
    except TaskError as e:
        raise TaskError(f"{path}: {e}") from None
    examples = []
    for where, obj in json_objects(path, TaskError):
        missing = [k for k in ("question", "choices", "label") if k not in obj]
        if missing:
            raise TaskError(f"{where}: missing key(s) {missing} (have {sorted(obj)})")
        q, choices, label = obj["question"], obj["choices"], obj["label"]
        if not isinstance(q, str):
            raise TaskError(f"{where}: 'question' must be a string")
        if not isinstance(choices, list) or not all(isinstance(c, str) and c for c in choices):
            raise TaskError(f"{where}: 'choices' must be a list of non-empty strings")
        if not choices:
            raise TaskError(f"{where}: 'choices' is empty")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise TaskError(f"{where}: 'label' {label!r} is not an index into the {len(choices)} choices")
        line_template, delim = obj.get("template", template), obj.get("target_delimiter", target_delimiter)
        if not isinstance(delim, str):
            raise TaskError(f"{where}: 'target_delimiter' must be a string")
        doubled = [c for c in choices if delim[-1:].isspace() and c[0].isspace()]
        if doubled:
            raise TaskError(f"{where}: choice {doubled[0]!r} starts with whitespace and target_delimiter is "
                            f"{delim!r}, so it would be scored with both; set target_delimiter to \"\"")
        try:
            prompt = question_prompt(q, line_template)
        except TaskError as e:
            raise TaskError(f"{where}: {e}") from None
        examples.append(MCExample(prompt, tuple(choices), label, delimiter=delim))
        if limit and len(examples) >= limit:
            break
    if not examples:
        raise TaskError(f"{path}: no examples")
    return examples


# -- scoring --------------------------------------------------------------------------------------------

def mc_metrics(examples: Sequence[MCExample], logprobs: Sequence[Sequence[float]]) -> dict:
    """``acc`` and ``acc_norm`` (means over examples) from each example's per-choice log-likelihoods."""
    if len(examples) != len(logprobs) or not examples:
        raise ValueError(f"{len(examples)} examples but {len(logprobs)} sets of log-likelihoods")
    acc, acc_norm = [], []
    for ex, lls in zip(examples, logprobs):
        lls = np.asarray(lls, np.float64)
        lengths = np.array([float(len(c)) for c in ex.choices])
        acc.append(float(np.argmax(lls) == ex.label))
        acc_norm.append(float(np.argmax(lls / lengths) == ex.label))
    return {"n": len(examples), "acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)),
            "chance": float(np.mean([1.0 / len(ex.choices) for ex in examples]))}


def score_mc(loglikelihood: LogLikelihood, examples: Sequence[MCExample]) -> dict:
    """Metrics of ``examples`` with one batched ``loglikelihood`` call over every choice."""
    pairs, sizes = [], []
    for ex in examples:
        pairs += ex.pairs()
        sizes.append(len(ex.choices))
    flat = [lp for lp, _ in loglikelihood(pairs)]
    bounds = np.cumsum([0] + sizes)
    return mc_metrics(examples, [flat[a:b] for a, b in zip(bounds, bounds[1:])])


# -- TFDS builders --------------------------------------------------------------------------------------

def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _arc(rec: dict) -> MCExample:
    labels = [int(v) for v in rec["choices"]["label"]]
    return MCExample(question_prompt(_text(rec["question"])),
                     tuple(_text(t) for t in rec["choices"]["text"]), labels.index(int(rec["answerKey"])))


def _openbookqa(rec: dict) -> MCExample:
    q = rec["question"]
    return MCExample(_text(q["stem"]), tuple(_text(q[f"choice_{k}"]) for k in "ABCD"), int(rec["answerKey"]))


def _piqa(rec: dict) -> MCExample:
    return MCExample(question_prompt(_text(rec["goal"])), (_text(rec["sol1"]), _text(rec["sol2"])),
                     int(rec["label"]))


def _hellaswag_clean(text: str) -> str:
    # lm-eval's preprocess: brackets are artifacts of the WikiHow half of HellaSwag.
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _hellaswag(rec: dict) -> MCExample:
    # TFDS keeps only ctx = ctx_a + " " + ctx_b; lm-eval also capitalises ctx_b, which cannot be redone here.
    query = _hellaswag_clean(f"{_text(rec['activity_label'])}: {_text(rec['context'])}")
    return MCExample(query, tuple(_hellaswag_clean(_text(e)) for e in rec["endings"]), int(rec["label"]))


def _bool_q(rec: dict) -> MCExample:
    prompt = f"{_text(rec['passage'])}\nQuestion: {_text(rec['question'])}?\nAnswer:"
    return MCExample(prompt, ("no", "yes"), int(bool(rec["answer"])))


def _winogrande(rec: dict) -> MCExample:
    # lm-eval's partial scoring: contexts = sentence up to the blank with each option, continuation = the rest.
    sentence = _text(rec["sentence"])
    i = sentence.index("_")
    ending = sentence[i + 1:].strip()
    options = (_text(rec["option1"]), _text(rec["option2"]))
    return MCExample("", (ending, ending), int(rec["label"]),
                     contexts=tuple(sentence[:i] + o for o in options))


@dataclasses.dataclass(frozen=True)
class TfdsTask:
    builder: str         # tfds name, with the config: "ai2_arc/ARC-Easy"
    split: str           # the split lm-eval reports
    convert: Callable[[dict], MCExample]


TFDS_TASKS = {
    "ai2_arc/ARC-Easy": TfdsTask("ai2_arc/ARC-Easy", "test", _arc),
    "ai2_arc/ARC-Challenge": TfdsTask("ai2_arc/ARC-Challenge", "test", _arc),
    "openbookqa": TfdsTask("openbookqa", "test", _openbookqa),
    "piqa": TfdsTask("piqa", "validation", _piqa),
    "hellaswag": TfdsTask("hellaswag", "validation", _hellaswag),
    "bool_q": TfdsTask("bool_q", "validation", _bool_q),
    "winogrande": TfdsTask("winogrande", "validation", _winogrande),
}


def load_tfds(name: str, data_dir: str | Path | None, limit: int | None = None) -> list[MCExample]:
    """Examples of a TFDS task (a key of ``TFDS_TASKS``) from data prepared under ``data_dir``.

    Nothing is downloaded: the builders fetch from AI2 S3 / GCS / GitHub, which this machine may not reach.
    Prepare the data elsewhere (ideally ``file_format="array_record"``, readable without TensorFlow) and copy
    the ``data_dir`` tree here."""
    if name not in TFDS_TASKS:
        raise TaskError(f"unknown TFDS task {name!r}; known: {sorted(TFDS_TASKS)}")
    task = TFDS_TASKS[name]
    import tensorflow_datasets as tfds
    import tensorflow_datasets.text  # noqa: F401  (hellaswag and winogrande register only on this import)
    builder = tfds.builder(task.builder, data_dir=str(data_dir) if data_dir else None)
    if not builder.is_prepared():
        raise TaskError(
            f"TFDS task {name!r}: no prepared data at {builder.data_dir} (data_dir={builder.data_dir_root}). "
            f"This machine does not download it. Prepare it elsewhere, e.g. "
            f"tfds.builder({task.builder!r}, data_dir=D).download_and_prepare(file_format='array_record'), "
            f"then copy D here and pass it as --tfds_data_dir")
    if task.split not in builder.info.splits:
        raise TaskError(f"TFDS task {name!r}: split {task.split!r} missing (have {sorted(builder.info.splits)})")
    source = _split_source(builder, task.split)
    n = len(source) if not limit else min(limit, len(source))
    examples = [task.convert(source[i]) for i in range(n)]
    if any(ex.label < 0 for ex in examples):  # unlabeled (test) rows carry -1
        raise TaskError(f"TFDS task {name!r}: split {task.split!r} has unlabeled examples")
    return examples


def _split_source(builder, split: str):
    """Random access to a prepared split: ``tfds.data_source`` for array_record (no TensorFlow), else
    ``as_dataset`` (TFRecord needs TensorFlow)."""
    try:
        return builder.as_data_source(split=split)
    except NotImplementedError:
        import tensorflow_datasets as tfds
        return list(tfds.as_numpy(builder.as_dataset(split=split)))


# -- needle in a haystack -------------------------------------------------------------------------------

NEEDLE = " The secret number is {number}."
QUESTION = "\nWhat is the secret number? The secret number is"  # ends where the number follows


@dataclasses.dataclass(frozen=True)
class NeedleExample:
    """Token ids of a haystack with a needle inside and the question at the end; ``candidates[0]`` is the
    true answer (" 4817"), the rest are distractor numbers."""
    context_ids: list[int]
    candidate_ids: list[list[int]]
    length: int          # the context-length bucket: len(context) + the longest candidate <= length
    depth: float         # requested needle position, 0 = start of the haystack, 1 = just before the question
    needle_at: int       # index of the needle's first token in context_ids
    number: int


def needle_examples(haystack_ids: np.ndarray, encode: Callable[[str], list[int]], lengths: Sequence[int],
                    depths: Sequence[float] = (0.0, 0.5, 1.0), samples: int = 4, n_candidates: int = 10,
                    seed: int = 0, skip_ids: Sequence[int] = ()) -> list[NeedleExample]:
    """``samples`` examples per (length, depth). The haystack is a contiguous run of ``haystack_ids`` (held-out
    text, with ``skip_ids`` such as the document separator removed) from a random offset; the needle's tokens
    are spliced in at ``round(depth * haystack tokens)``, a token boundary, so lengths are exact."""
    rng = np.random.default_rng(seed)
    hay = np.asarray(haystack_ids)
    if len(skip_ids):
        hay = hay[~np.isin(hay, np.asarray(skip_ids))]
    question = encode(QUESTION)
    out = []
    for length in lengths:
        for depth in depths:
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"needle depth {depth} is outside [0, 1]")
            for _ in range(samples):
                numbers = rng.choice(np.arange(1000, 10000), size=n_candidates, replace=False)
                needle = encode(NEEDLE.format(number=int(numbers[0])))
                candidates = [encode(f" {int(x)}") for x in numbers]
                n_hay = length - len(needle) - len(question) - max(map(len, candidates))
                if n_hay < 1:
                    raise ValueError(f"needle length {length} leaves no room for a haystack (needle, question "
                                     f"and answer take {length - n_hay} tokens)")
                if n_hay > len(hay):
                    raise ValueError(f"needle length {length} needs {n_hay} haystack tokens, only {len(hay)}")
                start = int(rng.integers(0, len(hay) - n_hay + 1))
                chunk = [int(t) for t in hay[start:start + n_hay]]
                at = int(round(depth * n_hay))
                context = chunk[:at] + needle + chunk[at:] + question
                out.append(NeedleExample(context, candidates, int(length), float(depth), at, int(numbers[0])))
    return out


def score_needles(loglikelihood_tokens: Callable[[list[tuple[list[int], list[int]]]], list[tuple[float, bool]]],
                  examples: Sequence[NeedleExample]) -> dict:
    """Accuracy of ranking the true number first among the candidates by log-likelihood (chance is
    1 / candidates), per length, per (length, depth), and overall."""
    requests = [(ex.context_ids, cand) for ex in examples for cand in ex.candidate_ids]
    flat = [lp for lp, _ in loglikelihood_tokens(requests)]
    hits, i = [], 0
    for ex in examples:
        lls = flat[i:i + len(ex.candidate_ids)]
        i += len(ex.candidate_ids)
        hits.append(float(np.argmax(lls) == 0))

    def mean_over(keep) -> float:
        sel = [h for h, ex in zip(hits, examples) if keep(ex)]
        return float(np.mean(sel))
    lengths = sorted({ex.length for ex in examples})
    depths = sorted({ex.depth for ex in examples})
    return {"acc": float(np.mean(hits)), "n": len(examples),
            "chance": float(np.mean([1 / len(ex.candidate_ids) for ex in examples])),
            "by_length": {str(n): mean_over(lambda ex: ex.length == n) for n in lengths},
            "by_length_depth": {str(n): {str(d): mean_over(lambda ex: ex.length == n and ex.depth == d)
                                         for d in depths} for n in lengths}}
