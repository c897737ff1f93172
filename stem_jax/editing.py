"""``python -m stem_jax.editing edit|inject``: knowledge editing and injection through STEM rows from the
command line, one edit or a JSONL file of them (``--edits``). The work is in ``editor.py`` (one edit, injection)
and ``edit_batch.py`` (many).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from absl import flags

from stem_jax import cli, edit_batch, workdir as workdir_lib
from stem_jax.corpus import encode_text
from stem_jax.editor import (MODES, POSITIONS, EditError, Editor, check_out, describe_tokens, entity_positions,
                             format_changed_rows, format_comparison, inject, pieces, target_ids)
from stem_jax.sampling import SamplingConfig
from stem_jax.workdir import load_tokenizer


def _print_edit_tokens(workdir: str, prompt: str, source: str, target: str) -> None:
    """The pieces of an ``edit`` as they read in the prompt, before the (slow) restore."""
    tok = load_tokenizer(workdir)
    src = pieces(tok, entity_positions(tok, prompt, source)[1])
    print(describe_tokens("source", source, src) + " (in the prompt)")
    if not target.strip():
        raise EditError("the target entity string is empty")
    print(describe_tokens("target", target, pieces(tok, target_ids(tok, prompt, source, target))))
    if len(src) > 1:
        print(f"note: the source is {len(src)} pieces whose rows every word containing them shares; this edit "
              "swaps them at the source's positions in this prompt only (inject would need --allow_shared_rows)")
        print(f"note: {MULTI_TOKEN_NOTE}")


# Measured by experiments/knowledge.py (docs/generation.md#where-a-fact-sits), printed for multi-token sources.
MULTI_TOKEN_NOTE = ("STEM-only edits rarely move facts about multi-token names: on the knowledge benchmark "
                    "they succeeded for 6% of two-word names against 84% of one-token names, while swapping only "
                    "the input embedding succeeded for 84% of the two-word names (3% of the one-token ones): such "
                    "a name is mostly identified by attention over its tokens' embeddings, not by their STEM rows")


def _print_inject_tokens(workdir: str, source: str, targets: Sequence[str]) -> None:
    tok = load_tokenizer(workdir)
    print(describe_tokens("source", source, pieces(tok, encode_text(tok, source).ids)))
    for t in targets:
        print(describe_tokens("target", t, pieces(tok, encode_text(tok, t).ids)))


COMMANDS = {"edit": "before/after top-k and generations for a row swap (no weights change)",
            "inject": "write rows permanently into a new workdir"}


def _define(fv: flags.FlagValues, command: str) -> None:
    flags.DEFINE_string("workdir", None, "A STEM workdir written by train.py.", required=True, flag_values=fv)
    flags.DEFINE_string("layers", "", "Comma-separated STEM layers (default: all).", flag_values=fv)
    flags.DEFINE_string("source", None, "Entity in the prompt (its last occurrence)." if command == "edit" else
                        'Token string whose rows change, e.g. " Spain".', flag_values=fv)
    flags.DEFINE_string("edits", None, 'JSONL file of {"prompt", "source", "target"} lines, run in one process '
                        + ('("expect": the answer to check), instead of the single-edit flags.' if command == "edit"
                           else "(prompt optional: source and target are read as in it), written atomically."),
                        flag_values=fv)
    if command == "edit":
        flags.DEFINE_string("prompt", None, "The prompt.", flag_values=fv)
        flags.DEFINE_string("target", None, "The entity whose rows replace the source's.", flag_values=fv)
        flags.DEFINE_enum("mode", "auto", MODES, "Multi-token alignment.", flag_values=fv)
        flags.DEFINE_enum("positions", "all", POSITIONS, "Edit every source token, or its last only.",
                          flag_values=fv)
        flags.DEFINE_integer("k", 5, "Next tokens shown.", flag_values=fv)
        flags.DEFINE_integer("max_new_tokens", 16, "Tokens generated before and after (single edit).",
                             flag_values=fv)
        flags.DEFINE_string("json", "", "Also write the result here.", flag_values=fv)
        cli.define_mesh_flag(fv)
    else:
        flags.DEFINE_string("out", None, "The new workdir.", required=True, flag_values=fv)
        flags.DEFINE_multi_string("target", None, "Target string; repeat to average several examples.",
                                  flag_values=fv)
        flags.DEFINE_enum("mode", "copy", MODES, "How source tokens take the target rows: copy (token i takes "
                          "target token i mod n_t), average, or an edit alignment.", flag_values=fv)
        flags.DEFINE_bool("allow_shared_rows", False, "Inject into a source of several tokens: those pieces' rows "
                          "change for every word that uses them (targets are only read and need no flag).",
                          flag_values=fv)


def _one_or_batch(f, single: Sequence[str]) -> None:
    given = [name for name in single if getattr(f, name)]
    if f.edits and given:
        cli.die(f"--edits replaces --{', --'.join(given)}: give one or the other")
    if not f.edits and len(given) < len(single):
        cli.die(f"give --edits FILE, or --{', --'.join(single)}")


def main(argv: list[str] | None = None) -> None:
    """``python -m stem_jax.editing edit|inject ...``"""
    command, f = cli.parse_command(argv, "python -m stem_jax.editing", "STEM knowledge editing.", _define, COMMANDS)
    layers = cli.int_list(f.layers, "layers")

    def run_edit():
        _print_edit_tokens(f.workdir, f.prompt, f.source, f.target)
        editor = Editor.from_workdir(f.workdir, mesh_shape=f.mesh)
        r = editor.compare(f.prompt, f.source, f.target, f.mode, layers, f.k,
                           SamplingConfig(max_new_tokens=f.max_new_tokens), f.positions)
        print(format_comparison(r))
        if f.json:
            Path(f.json).write_text(json.dumps(r, indent=1) + "\n")

    def run_edits():
        requests = edit_batch.read_edits(f.edits)
        tok = load_tokenizer(f.workdir)  # every edit is checked before the restore
        edit_batch.check_edits(tok, requests, f.mode, f.positions, "stem", workdir_lib.load_eos_id(f.workdir, tok))
        editor = Editor.from_workdir(f.workdir, mesh_shape=f.mesh)
        r = edit_batch.run_edits(editor, requests, f.mode, layers, f.k, f.positions)
        print(edit_batch.format_edit_table(r))
        multi = sum(len(x["source_tokens"]) > 1 for x in r["edits"])
        if multi:
            print(f"{multi} of {len(requests)} sources are several tokens. {MULTI_TOKEN_NOTE}")
        if f.json:
            Path(f.json).write_text(json.dumps(r, indent=1) + "\n")

    def run_inject():
        check_out(f.workdir, f.out)  # before anything is read or printed
        if f.edits:
            r = edit_batch.inject_edits(f.workdir, f.out, edit_batch.read_edits(f.edits, need_prompt=False), f.mode,
                                        layers, allow_shared_rows=f.allow_shared_rows)
            what = f"{len(r['edits'])} edits ({r['mode']})"
        else:
            _print_inject_tokens(f.workdir, f.source, f.target)
            r = inject(f.workdir, f.out, f.source, f.target, f.mode, layers, allow_shared_rows=f.allow_shared_rows)
            what = f"{r['source']!r} <- {r['targets']} ({r['mode']})"
        rows = r["changed_rows"]
        n_tokens = len({c["token_id"] for c in rows})
        print(f"injected {what}: {len(rows)} rows changed ({n_tokens} token{'' if n_tokens == 1 else 's'}) -> "
              f"{f.out} (report: {Path(f.out) / 'injection.json'})")
        if rows:
            print(format_changed_rows(rows))

    if command == "edit":
        _one_or_batch(f, ("prompt", "source", "target"))
        cli.run_user_errors(run_edits if f.edits else run_edit)
    else:
        _one_or_batch(f, ("source", "target"))
        cli.run_user_errors(run_inject)


if __name__ == "__main__":
    main()
