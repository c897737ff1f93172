"""Knowledge editing and injection through STEM rows (paper §3.3; rules in ../shared/spec/stem-paper.md §5.1).

Editing: at every STEM layer (or a chosen subset), the rows looked up at the source entity's token positions
(its last occurrence in the prompt, located with the tokenizer's character offsets) are replaced by the target
entity's rows. The prompt text, the token ids, the input embedding and the weights stay as they are; the
override is an argument of the jitted forward, so a new edit does not re-trace. Multi-token entities:

    one_to_one   n_s == n_t: position i takes target token i
    average      every source position takes the mean of the target tokens' rows
    copy         position i takes target token i mod n_t (cyclic)
    left_pad     n_s > n_t: pad rows first, then the target; n_s < n_t: the last n_s target tokens
    right_pad    n_s > n_t: the target, then pad rows; n_s < n_t: the first n_s target tokens
    auto         one_to_one when the lengths match, else average

The pad row is that of the run's end-of-document token (``data.eos_token``; the tokenizer has no other pad
token). Text is encoded as training encoded documents (``corpus.encode_text``: no BOS). ``positions='last'`` edits
only the source's last token, which takes the target's last token's row. Two controls that are not STEM edits
measure how much of a fact lives outside the rows (``swap``): ``stem+embedding`` also puts the target's tokens
in the prompt (the input embedding changes too), ``embedding`` puts them in the prompt but keeps the source's
STEM rows. Injection writes rows into a copy of the tables and saves it as a new workdir, with a report of every
row that changed. ``edit_batch.py`` runs a JSONL file of edits; ``editing.py`` is the command line.

A STEM row belongs to a token id, not to a word: a source that splits into several tokens (``' Xqzzy'`` ->
``' X', 'q', 'zz', 'y'``) owns none of its rows, every other word made of those pieces reads them too. Both
commands print the pieces first; ``inject`` refuses such a source unless ``--allow_shared_rows`` is given,
``edit`` (one prompt, nothing saved) only notes it. Targets are only read, so their pieces need no permission.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stem_jax import corpus, workdir as workdir_lib
from stem_jax.config import stem_indices
from stem_jax.sampling import Sampler, SamplingConfig
from stem_jax.stem import RowEdit
from stem_jax.workdir import load_run_config, load_tokenizer

MODES = ("auto", "one_to_one", "average", "copy", "left_pad", "right_pad")
POSITIONS = ("all", "last")
SWAPS = ("stem", "stem+embedding", "embedding")


class EditError(ValueError):
    """An edit that cannot be made (entity not in the prompt, mode and lengths that do not fit, ...)."""


def entity_positions(tokenizer: Any, text: str, entity: str) -> tuple[list[int], list[int]]:
    """(token positions, token ids) of the last occurrence of ``entity`` in ``text``: every token whose
    character span overlaps the entity's."""
    if not entity.strip():
        raise EditError("the entity string is empty")
    start = text.rfind(entity)
    if start < 0:
        raise EditError(f"{entity!r} does not occur in the prompt {text!r}")
    end = start + len(entity)
    enc = corpus.encode_text(tokenizer, text)
    pos = [i for i, (a, b) in enumerate(enc.offsets) if a < end and b > start]
    return pos, [enc.ids[i] for i in pos]


def target_ids(tokenizer: Any, prompt: str, source: str, target: str) -> list[int]:
    """The target's tokens as they would read in the prompt's place of the source (same leading space)."""
    start = prompt.rfind(source)
    replaced = prompt[:start] + target + prompt[start + len(source):]
    return entity_positions(tokenizer, replaced[:start + len(target)], target)[1]


def pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The token strings of ``ids``: what the STEM rows are indexed by."""
    return [tokenizer.decode([int(i)]) for i in ids]


def describe_tokens(role: str, text: str, tokens: Sequence[str]) -> str:
    """``source ' Xqzzy' -> 4 tokens [' X', 'q', 'zz', 'y']``"""
    return f"{role} {text!r} -> {len(tokens)} token{'' if len(tokens) == 1 else 's'} {list(tokens)}"


def plan_rows(n_source: int, target: Sequence[int], mode: str, pad_id: int) -> list[list[tuple[int, float]]]:
    """Per source position, the (token id, weight) rows that replace its own."""
    n_t = len(target)
    if mode not in MODES:
        raise EditError(f"unknown edit mode {mode!r}; choose from {MODES}")
    if mode == "auto":
        mode = "one_to_one" if n_source == n_t else "average"
    if mode == "one_to_one":
        if n_source != n_t:
            raise EditError(f"mode one_to_one needs equal lengths, but the source has {n_source} tokens and the "
                            f"target {n_t}; use average, copy, left_pad or right_pad")
        return [[(t, 1.0)] for t in target]
    if mode == "average":
        return [[(t, 1.0 / n_t) for t in target] for _ in range(n_source)]
    if mode == "copy":
        return [[(target[i % n_t], 1.0)] for i in range(n_source)]
    if n_t >= n_source:  # truncate the longer target
        kept = target[n_t - n_source:] if mode == "left_pad" else target[:n_source]
        return [[(t, 1.0)] for t in kept]
    pads = [[(pad_id, 1.0)]] * (n_source - n_t)
    rows = [[(t, 1.0)] for t in target]
    return pads + rows if mode == "left_pad" else rows + pads


@dataclasses.dataclass
class Edit:
    """A prepared edit of one prompt: the arrays the forward takes, and what they mean. ``input_ids`` is the
    prompt as fed under the edit: ``prompt_ids`` except under the embedding controls."""
    prompt_ids: list[int]
    source_positions: list[int]
    source_ids: list[int]
    target_ids: list[int]
    ids_LxM: np.ndarray
    weights_LxM: np.ndarray
    on_S: np.ndarray        # per STEM layer
    input_ids: list[int]

    def arrays(self) -> RowEdit:
        return RowEdit(self.ids_LxM[None], self.weights_LxM[None], self.on_S)


def plan_edit(tokenizer: Any, pad_id: int, prompt: str, source: str, target: str, mode: str = "auto",
              positions: str = "all", swap: str = "stem") -> tuple:
    """(prompt ids, edited positions, source ids, target ids, rows per edited position, input ids) from the
    tokenizer alone, so a batch of edits is checked before any weights are read."""
    if positions not in POSITIONS:
        raise EditError(f"unknown positions {positions!r}; choose from {POSITIONS}")
    if swap not in SWAPS:
        raise EditError(f"unknown swap {swap!r}; choose from {SWAPS}")
    prompt_ids = corpus.encode_text(tokenizer, prompt).ids
    pos, src = entity_positions(tokenizer, prompt, source)
    if not target.strip():
        raise EditError("the target entity string is empty")
    tgt = target_ids(tokenizer, prompt, source, target)
    if positions == "last":
        pos, src, rows = pos[-1:], src[-1:], [[(tgt[-1], 1.0)]]
    else:
        rows = plan_rows(len(pos), tgt, mode, pad_id)
    input_ids = list(prompt_ids)
    if swap != "stem":
        if any(len(r) != 1 for r in rows):
            raise EditError(f"swap={swap!r} writes one target token into each source position, but mode {mode!r} "
                            "mixes several rows; use one_to_one, copy, left_pad or right_pad")
        for p, r in zip(pos, rows):
            input_ids[p] = r[0][0]
    return prompt_ids, pos, src, tgt, rows, input_ids


class Editor:
    """Row-swap editing on a STEM checkpoint: next-token views and generations with and without an edit."""

    def __init__(self, sampler: Sampler, stem_layers: Sequence[int]):
        if not stem_layers:
            raise EditError("the model has no STEM layers (a dense checkpoint): there are no rows to edit")
        self.sampler, self.stem_layers, self.tokenizer = sampler, tuple(stem_layers), sampler.tokenizer

    @classmethod
    def from_workdir(cls, workdir: str | Path, step: int | None = None,
                     mesh_shape: Sequence[int] | str = "auto") -> "Editor":
        cfg = load_run_config(workdir)
        if cfg.model.ffn != "stem":
            raise EditError(f"{workdir} holds a model.ffn={cfg.model.ffn!r} model; editing needs STEM layers "
                            "(model.ffn='stem')")
        return cls(Sampler.from_workdir(workdir, step, mesh_shape), stem_indices(cfg.model))

    def prepare(self, prompt: str, source: str, target: str, mode: str = "auto",
                layers: Sequence[int] | None = None, positions: str = "all", swap: str = "stem") -> Edit:
        bad = [i for i in (layers or ()) if i not in self.stem_layers]
        if bad:
            raise EditError(f"layers {bad} are not STEM layers; the STEM layers are {list(self.stem_layers)}")
        prompt_ids, pos, src, tgt, rows, input_ids = plan_edit(self.tokenizer, self.sampler.eos, prompt, source,
                                                               target, mode, positions, swap)
        M = -(-max(len(r) for r in rows) // 4) * 4  # a multiple of 4 (zero weights): fewer distinct shapes to compile
        ids_LxM = np.zeros((len(prompt_ids), M), np.int32)
        w_LxM = np.zeros((len(prompt_ids), M), np.float32)
        ids_LxM[:, 0], w_LxM[:, 0] = input_ids, 1.0  # every other position keeps its own row
        for p, r in zip(pos, rows):
            if swap == "embedding":  # the control: the target's tokens in the prompt, the source's STEM rows
                ids_LxM[p, 0] = prompt_ids[p]
                continue
            ids_LxM[p], w_LxM[p] = 0, 0.0
            for m, (t, w) in enumerate(r):
                ids_LxM[p, m], w_LxM[p, m] = t, w
        on_S = np.array([layers is None or i in layers for i in self.stem_layers])
        return Edit(prompt_ids, pos, src, tgt, ids_LxM, w_LxM, on_S, input_ids)

    def compare(self, prompt: str, source: str, target: str, mode: str = "auto", layers=None, k: int = 5,
                sampling: SamplingConfig = SamplingConfig(max_new_tokens=16), positions: str = "all",
                swap: str = "stem") -> dict:
        """Before/after top-k next tokens and generations (none when ``sampling.max_new_tokens`` is 0)."""
        e = self.prepare(prompt, source, target, mode, layers, positions, swap)
        tok = lambda ids: [self.tokenizer.decode([i]) for i in ids]
        out = {"prompt": prompt, "source": source, "target": target, "mode": mode,
               "layers": [i for i, on in zip(self.stem_layers, e.on_S) if on],
               "source_tokens": tok(e.source_ids), "target_tokens": tok(e.target_ids),
               "source_positions": e.source_positions}
        for name, ids, edit in (("before", e.prompt_ids, None), ("after", e.input_ids, e.arrays())):
            new = self.sampler.generate_ids([ids], sampling, edit)[0].tolist() if sampling.max_new_tokens else []
            new = new[:new.index(self.sampler.eos)] if self.sampler.eos in new else new
            out[name] = {"top_k": self.sampler.next_token_topk(ids, k, edit), "generation": self.tokenizer.decode(new)}
        return out


def format_comparison(r: dict) -> str:
    """Side-by-side text of ``Editor.compare``'s result."""
    lines = [f"prompt: {r['prompt']!r}", f"edit: {r['source_tokens']} -> {r['target_tokens']} ({r['mode']}) at "
             f"positions {r['source_positions']}, STEM layers {r['layers']}", "",
             f"{'rank':<5} {'before':<28} {'after':<28}"]
    for i, (b, a) in enumerate(zip(r["before"]["top_k"], r["after"]["top_k"])):
        lines.append(f"{i + 1:<5} {f'{b[0]!r} {b[1]:.3f}':<28} {f'{a[0]!r} {a[1]:.3f}':<28}")
    lines += ["", f"before: {r['prompt']}{r['before']['generation']}", f"after:  {r['prompt']}{r['after']['generation']}"]
    return "\n".join(lines)


def shared_rows_error(source: str, tokens: Sequence[str]) -> EditError:
    """The one-line refusal of a multi-token injection source."""
    return EditError(f"source {source!r} splits into {len(tokens)} tokens {list(tokens)}: STEM rows belong to "
                     "token ids, so injecting would change these pieces' rows for every word that uses them; "
                     "--allow_shared_rows (allow_shared_rows=True) permits it")


def check_out(workdir: str | Path, out: str | Path) -> None:
    """Refuse an injection output that is, holds or sits inside the source workdir, or sits inside a run's
    ``checkpoints`` folder (a new run there would read as a broken checkpoint of that run)."""
    src, dst = Path(workdir).resolve(), Path(out).resolve()
    if dst == src or src in dst.parents:
        raise EditError(f"--out {out} is inside the source workdir {workdir}; give a new folder outside it")
    if dst in src.parents:
        raise EditError(f"--out {out} contains the source workdir {workdir}; give a new folder outside it")
    runs = [p.parent for p in (dst, *dst.parents) if p.name == "checkpoints" and (p.parent / "config.json").is_file()]
    for run in runs[:1]:
        raise EditError(f"--out {out} is inside the checkpoints folder of the run {run}; give a new folder outside it")


def inject(workdir: str | Path, out: str | Path, source: str, targets: Sequence[str], mode: str = "copy",
           layers: Sequence[int] | None = None, step: int | None = None, allow_shared_rows: bool = False) -> dict:
    """Write rows permanently and save the result as a new workdir (parameters only).

    ``source`` and each of ``targets`` are tokenized as given (include the leading space of a mid-sentence
    word, e.g. ``" Spain"``). ``copy``: source token i takes the rows of target token i mod n_t (of the first
    target); ``average``: every source token takes the mean row of all target tokens, so several example
    strings set a token's rows from their average; the other modes align the first target as ``plan_rows``
    does. A source of several tokens is refused (EditError) unless ``allow_shared_rows``: every word
    containing those pieces reads the same rows. (A single-token source is its own row, though words that
    contain that token as a piece read it too.) Multi-token targets need no permission: their rows are only
    read. Returns the diff report (also written to ``<out>/injection.json``)."""
    if mode not in MODES:
        raise EditError(f"unknown injection mode {mode!r}; choose from {MODES}")
    check_out(workdir, out)
    tok = load_tokenizer(workdir)
    src = corpus.encode_text(tok, source).ids
    tgts = [corpus.encode_text(tok, t).ids for t in targets]
    if not src or not tgts or not all(tgts):
        raise EditError("the source and every target must be non-empty strings")
    if len(src) > 1 and not allow_shared_rows:  # before reading any weights
        raise shared_rows_error(source, pieces(tok, src))
    if mode == "average":
        every = [t for ids in tgts for t in ids]
        rows = [[(t, 1.0 / len(every)) for t in every]] * len(src)
    else:
        rows = plan_rows(len(src), tgts[0], mode, workdir_lib.load_eos_id(workdir, tok))
    report = {"source": source, "targets": list(targets), "mode": mode, "source_ids": src, "target_ids": tgts,
              "source_tokens": pieces(tok, src), "target_tokens": [pieces(tok, t) for t in tgts],
              "allow_shared_rows": allow_shared_rows}
    return write_injection(workdir, out, dict(zip(src, rows)), report, layers, step)


def write_injection(workdir: str | Path, out: str | Path, writes: dict[int, list[tuple[int, float]]],
                    report: dict, layers: Sequence[int] | None = None, step: int | None = None) -> dict:
    """Token id -> weighted rows of other tokens, every row read from the checkpoint before any is written,
    at every STEM layer (or ``layers``); saved as a new workdir whose ``injection.json`` is ``report`` plus
    the source checkpoint and every changed row."""
    cfg = load_run_config(workdir)
    stem = stem_indices(cfg.model)
    if cfg.model.ffn != "stem" or not stem:
        raise EditError(f"{workdir} has no STEM layers (model.ffn={cfg.model.ffn!r}): nothing to inject into")
    bad = [i for i in (layers or ()) if i not in stem]
    if bad:
        raise EditError(f"layers {bad} are not STEM layers; the STEM layers are {list(stem)}")
    check_out(workdir, out)
    workdir_lib.check_new_workdir(Path(out))
    tok = load_tokenizer(workdir)
    cfg, arrays, step = workdir_lib.read_params(workdir, step)
    changed = []
    for layer in (layers or stem):
        key = ("blocks", layer, "ffn", "table")
        before = arrays[key]
        table = before.copy()
        for s, rows in writes.items():
            ids, w = [t for t, _ in rows], np.array([w for _, w in rows], np.float32)
            same = np.all(w == w[0]) and abs(w[0] * len(w) - 1) < 1e-6  # copy or a plain mean: exact as np.mean
            table[s] = before[ids].mean(axis=0) if same else (w[:, None] * before[ids]).sum(axis=0)
        arrays[key] = table[:cfg.model.vocab_size]
        rows_changed = np.flatnonzero(np.any(table != before, axis=1))
        changed += [{"layer": layer, "token_id": int(r), "token": tok.decode([int(r)])} for r in rows_changed]
    report = {"from": str(workdir), "step": step, **report, "changed_rows": changed}
    workdir_lib.write_workdir(out, cfg, arrays, Path(workdir) / "tokenizer.json",
                              f"injection into {workdir} step {step}",
                              command=f"stem_jax.editing inject from {workdir}",
                              extra_files={"injection.json": json.dumps(report, indent=1) + "\n"})
    return report


def format_changed_rows(changed: Sequence[dict]) -> str:
    """``injection.json``'s changed rows, one line per token: its string, id and the STEM layers changed."""
    by_id: dict[int, tuple[str, list[int]]] = {}
    for c in changed:
        by_id.setdefault(c["token_id"], (c["token"], []))[1].append(c["layer"])
    width = max([len(repr(t)) for t, _ in by_id.values()] + [5])
    lines = [f"  {t!r:<{width}}  id {i:<7} layers {layers}" for i, (t, layers) in sorted(by_id.items())]
    return "\n".join(["changed rows (token, id, STEM layers):", *lines])
