"""Many edits in one process: a JSONL file of ``{"prompt", "source", "target"}`` (``"expect"`` optional) read
and checked against the tokenizer before any weights are loaded, then run with one restore (``run_edits``) or
written as one atomic injection (``inject_edits``). ``python -m stem_jax.editing edit|inject --edits F``.

``expect`` is the answer the edit should produce: its first token, as it continues the prompt (a space is put
before it unless it or the prompt's end has one), is compared with the edited model's top-1 next token.
An injection reads every row from the checkpoint before writing any, so swaps (a <- b with b <- a) are
well defined; two edits that write different rows into the same token are refused.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stem_jax import workdir as workdir_lib
from stem_jax.corpus import encode_text
from stem_jax.editor import (EditError, Editor, entity_positions, pieces, plan_edit, plan_rows, shared_rows_error,
                             target_ids, write_injection)
from stem_jax.sampling import top_tokens
from stem_jax.sources import json_objects
from stem_jax.workdir import load_tokenizer

KEYS = ("prompt", "source", "target", "expect")


@dataclasses.dataclass(frozen=True)
class EditRequest:
    source: str
    target: str
    prompt: str | None = None
    expect: str | None = None
    where: str = ""         # file:line, for messages


def read_edits(path: str | Path, need_prompt: bool = True) -> list[EditRequest]:
    """The edits of a JSONL file (blank lines skipped); a bad line is an EditError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise EditError(f"{path}: no such edits file")
    edits = []
    for where, obj in json_objects(path, EditError):
        unknown = sorted(set(obj) - set(KEYS))
        missing = [k for k in (("prompt", "source", "target") if need_prompt else ("source", "target")) if k not in obj]
        if unknown or missing:
            raise EditError(f"{where}: " + (f"unknown key(s) {unknown} (allowed: {list(KEYS)})" if unknown else
                                            f"missing key(s) {missing} (have {sorted(obj)})"))
        bad = [k for k in KEYS if k in obj and not (isinstance(obj[k], str) and obj[k].strip())]
        if bad:
            raise EditError(f"{where}: {bad[0]!r} must be a non-empty string")
        edits.append(EditRequest(obj["source"], obj["target"], obj.get("prompt"), obj.get("expect"), where))
    if not edits:
        raise EditError(f"{path}: no edits")
    return edits


def _at(r: EditRequest, fn, *args):
    try:
        return fn(*args)
    except EditError as e:
        raise EditError(f"{r.where}: {e}") from None


def expected_id(tokenizer: Any, prompt: str, expect: str) -> int:
    """The first token of ``expect`` continuing ``prompt``."""
    cont = expect if expect[:1].isspace() or prompt[-1:].isspace() else " " + expect
    return encode_text(tokenizer, prompt + cont).ids[len(encode_text(tokenizer, prompt).ids)]


def check_edits(tokenizer: Any, requests: Sequence[EditRequest], mode: str, positions: str, swap: str,
                eos_id: int) -> None:
    """Every edit planned against the tokenizer (``eos_id``: the run's, the pad row): the first that cannot be
    made is an EditError naming its line."""
    for r in requests:
        _at(r, plan_edit, tokenizer, eos_id, r.prompt, r.source, r.target, mode, positions, swap)


def run_edits(editor: Editor, requests: Sequence[EditRequest], mode: str = "auto", layers=None, k: int = 5,
              positions: str = "all", swap: str = "stem") -> dict:
    """Top-k next tokens before and after each edit, and whether the top-1 after is the ``expect`` token. An edit
    that cannot be made is an EditError naming its line (``check_edits`` finds it without any forward)."""
    before: dict[tuple, np.ndarray] = {}
    rows = []
    for r in requests:
        e = _at(r, editor.prepare, r.prompt, r.source, r.target, mode, layers, positions, swap)
        key = tuple(e.prompt_ids)
        if key not in before:
            before[key] = editor.sampler.next_token_logits(e.prompt_ids)
        after = editor.sampler.next_token_logits(e.input_ids, e.arrays())
        row = {"where": r.where, "prompt": r.prompt, "source": r.source, "target": r.target,
               "source_tokens": pieces(editor.tokenizer, e.source_ids),
               "target_tokens": pieces(editor.tokenizer, e.target_ids),
               "before": top_tokens(editor.tokenizer, before[key], k), "after": top_tokens(editor.tokenizer, after, k)}
        if r.expect is not None:
            want = expected_id(editor.tokenizer, r.prompt, r.expect)
            row.update(expect=r.expect, expect_token=editor.tokenizer.decode([want]),
                       hit=bool(np.argmax(after) == want), hit_before=bool(np.argmax(before[key]) == want))
        rows.append(row)
    hits = [x["hit"] for x in rows if "hit" in x]
    return {"mode": mode, "positions": positions, "swap": swap,
            "layers": [i for i in editor.stem_layers if layers is None or i in layers], "edits": rows,
            "n": len(rows), "with_expect": len(hits), "success": float(np.mean(hits)) if hits else None}


def format_edit_table(result: dict) -> str:
    """One line per edit: where, source -> target pieces, top-1 before and after, and the expect check."""
    lines = [f"{'edit':<20} {'source -> target':<36} {'before':<22} {'after':<22} expect"]
    for x in result["edits"]:
        b, a = x["before"][0], x["after"][0]
        check = "" if "hit" not in x else f"{x['expect_token']!r} {'yes' if x['hit'] else 'no'}"
        st = f"{x['source_tokens']} -> {x['target_tokens']}"
        lines.append(f"{Path(x['where']).name:<20} {st:<36} {f'{b[0]!r} {b[1]:.2f}':<22} {f'{a[0]!r} {a[1]:.2f}':<22} "
                     f"{check}")
    if result["with_expect"]:
        hits = sum(x["hit"] for x in result["edits"] if "hit" in x)
        lines.append(f"edit success {hits}/{result['with_expect']} ({result['success']:.1%}); mode {result['mode']}, "
                     f"positions {result['positions']}, STEM layers {result['layers']}")
    return "\n".join(lines)


def inject_edits(workdir: str | Path, out: str | Path, requests: Sequence[EditRequest], mode: str = "copy",
                 layers: Sequence[int] | None = None, step: int | None = None,
                 allow_shared_rows: bool = False) -> dict:
    """Every edit's rows written at once into a new workdir. With a ``prompt``, source and target are read as in
    it (``edit``'s tokens); without, tokenized as given. Conflicts, unknown entities and multi-token sources
    (unless ``allow_shared_rows``) are refused before any weights are read."""
    tok = load_tokenizer(workdir)
    pad = workdir_lib.load_eos_id(workdir, tok)
    writes: dict[int, tuple[list, EditRequest]] = {}
    edits = []
    for r in requests:
        if r.prompt is not None:
            src = _at(r, entity_positions, tok, r.prompt, r.source)[1]
            tgt = _at(r, target_ids, tok, r.prompt, r.source, r.target)
        else:
            src, tgt = encode_text(tok, r.source).ids, encode_text(tok, r.target).ids
        if not src or not tgt:
            raise EditError(f"{r.where}: the source and the target must tokenize to at least one token")
        if len(src) > 1 and not allow_shared_rows:
            raise EditError(f"{r.where}: {shared_rows_error(r.source, pieces(tok, src))}")
        for s, rows in zip(src, _at(r, plan_rows, len(src), tgt, mode, pad)):
            if s in writes and writes[s][0] != rows:
                raise EditError(f"{r.where}: conflicts with {writes[s][1].where}: both write token "
                                f"{tok.decode([s])!r} (id {s}) with different rows; one edit per source token")
            writes[s] = (rows, r)
        edits.append({"where": r.where, "prompt": r.prompt, "source": r.source, "target": r.target,
                      "source_tokens": pieces(tok, src), "target_tokens": pieces(tok, tgt)})
    report = {"edits": edits, "mode": mode, "allow_shared_rows": allow_shared_rows}
    return write_injection(workdir, out, {s: rows for s, (rows, _) in writes.items()}, report, layers, step)
