"""Analysis of trained workdirs (paper §5.2 and §5.3):

``angular``: the pairwise cosine similarity between the STEM table rows of the ``top_n`` most frequent tokens
(frequencies counted on the workdir's *training* split), per STEM layer, and, with a dense twin, between its
up-projection outputs ``W_up x`` at the same layer on the same tokens. ``x`` is the dense model's FFN input
(``ffn_norm`` of the residual stream) while it reads the held-out split in windows of ``seq_len``: by default at
each token's first occurrence (``--dense_x=first``), or averaged over all its occurrences (``--dense_x=mean``,
which equals the mean of ``W_up x`` since it is linear). Tokens absent from the analysed held-out windows are
dropped from both sides, so STEM and dense are compared on the same tokens.

``activated``: the number of distinct tokens ``L_uniq`` in windows of ``L = 2^k`` tokens of held-out text, the
activated STEM parameters ``|S| * d_ff * L_uniq`` (§2.3) and a Heaps-law fit ``L_uniq ~ K * L^beta``.

    python -m stem_jax.analysis angular --workdir runs/tiny --dense_workdir runs/tiny_dense --top_n 1000
    python -m stem_jax.analysis activated --workdir runs/tiny [--text_file F] [--max_len N]
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from matplotlib.figure import Figure  # the object API: files only, no pyplot state or display

from stem_jax import checkpoint, cli, corpus as corpus_lib, data
from stem_jax.config import stem_indices, validate
from stem_jax.workdir import load_run_config, load_tokenizer, restore

PAPER_P95 = "paper (1B, §5.2): STEM rows P95 |cos| 0.026-0.033; dense up-projection cosines centred near 0.15"
HELD_OUT_TOKENS = 1 << 24  # the activated-parameter windows are drawn from at most this much held-out text


# ---------------------------------------------------------------- statistics (pure numpy)

def pairwise_cosines(rows_NxF: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair i < j of rows (float64), as a flat array of N(N-1)/2 values."""
    x = np.asarray(rows_NxF, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    i, j = np.triu_indices(len(x), k=1)
    return (x @ x.T)[i, j]


def cosine_stats(cos: np.ndarray) -> dict:
    return {"pairs": int(cos.size), "mean": float(np.mean(cos)), "std": float(np.std(cos)),
            "p95_abs": float(np.percentile(np.abs(cos), 95)), "median": float(np.median(cos))}


def unique_counts(tokens: np.ndarray, lengths, windows: int = 32, seed: int = 0) -> list[dict]:
    """Per length L: distinct tokens in up to ``windows`` windows of L tokens at random distinct offsets."""
    tokens, rng, out = np.asarray(tokens), np.random.default_rng(seed), []
    for L in lengths:
        n_start = len(tokens) - L + 1
        if n_start < 1:
            raise ValueError(f"length {L} exceeds the {len(tokens)} tokens of the text")
        starts = np.sort(rng.choice(n_start, size=min(windows, n_start), replace=False))
        u = np.array([np.unique(tokens[s:s + L]).size for s in starts], np.float64)
        out.append({"L": int(L), "L_uniq": float(u.mean()), "L_uniq_std": float(u.std()), "windows": int(u.size)})
    return out


def activated_params(n_stem_layers: int, d_ff: int, l_uniq):
    """Activated STEM parameters of a sequence (paper §2.3): |S| * d_ff * L_uniq."""
    return n_stem_layers * d_ff * l_uniq


def heaps_fit(L, l_uniq) -> dict:
    """Least squares of log L_uniq = log K + beta log L; R^2 in log space."""
    x, y = np.log(np.asarray(L, np.float64)), np.log(np.asarray(l_uniq, np.float64))
    beta, log_k = np.polyfit(x, y, 1)
    resid, total = y - (log_k + beta * x), y - y.mean()
    r2 = 1.0 - float(resid @ resid) / float(total @ total) if total @ total > 0 else 1.0
    return {"K": float(np.exp(log_k)), "beta": float(beta), "r2": r2}


def context_lengths(max_len: int) -> list[int]:
    """1, 2, 4, ... up to ``max_len`` (and ``max_len`` itself when it is not a power of two)."""
    out = [2 ** k for k in range(max_len.bit_length()) if 2 ** k <= max_len]
    return out + ([max_len] if out[-1] != max_len else [])


# ---------------------------------------------------------------- workdirs

def _fingerprint(tokenizer) -> str:
    return checkpoint.fingerprint(tokenizer.to_str())


def open_workdir_corpus(workdir: Path, cfg):
    """The workdir's corpus (built from its config's data section), checked against its tokenizer.json."""
    corpus = data.open_corpus(cfg)
    saved = workdir / "tokenizer.json"
    if saved.is_file() and _fingerprint(load_tokenizer(workdir)) != _fingerprint(corpus.tokenizer):
        raise ValueError(f"{workdir}/tokenizer.json differs from the tokenizer of its data config's corpus "
                         f"({corpus.path}); token frequencies would not match the checkpoint")
    return corpus


def table_layers(workdir: Path, cfg) -> tuple[int, ...]:
    layers = stem_indices(cfg.model)
    if not layers:
        raise ValueError(f"{workdir} has no STEM layers (model.ffn={cfg.model.ffn!r}); give a STEM workdir")
    if cfg.model.ffn == "hash_moe":
        raise ValueError(f"{workdir} has no STEM tables (model.ffn='hash_moe'); give a STEM workdir")
    return layers


def restore_model(workdir: Path, cfg, step: int | None = None):
    """(host model, step): the checkpoint restored onto one device, merged with numpy parameters."""
    run = restore(workdir, (1, 1, 1), step, devices=jax.devices()[:1], cfg=cfg)
    return nnx.merge(run.graphdef, jax.device_get(run.params)), run.step


def ffn_input_chunks(model, ids_BxL: np.ndarray, layers, chunk: int = 16):
    """Yields, per ``chunk`` rows of ``ids``, {layer: ``ffn_norm`` of the residual entering its FFN} (float32
    numpy [rows, L, D]); one compiled program (the last chunk is padded)."""
    graphdef, state = nnx.split(model)
    last = max(layers)

    @jax.jit
    def run(state, ids):
        m = nnx.merge(graphdef, state)
        x, out = m._embed(ids), {}  # the model's own embedding step (dtype, sharding)
        for i, block in enumerate(m.blocks):
            x = x + block.attn(block.attn_norm(x))
            h = block.ffn_norm(x)
            if i in layers:
                out[i] = h.astype(jnp.float32)
            if i == last:
                return out
            x = x + block.ffn(h, ids)

    for b in range(0, len(ids_BxL), chunk):
        part = np.asarray(ids_BxL[b:b + chunk], np.int32)
        padded = np.pad(part, ((0, chunk - len(part)), (0, 0)))
        yield {i: np.asarray(h)[:len(part)] for i, h in run(state, jnp.asarray(padded)).items()}


def ffn_inputs(model, ids_BxL: np.ndarray, layers) -> dict:
    """``ffn_norm`` of the residual stream entering the FFN of each of ``layers`` (float32 numpy [B, L, D])."""
    chunks = list(ffn_input_chunks(model, ids_BxL, layers))
    return {i: np.concatenate([c[i] for c in chunks]) for i in layers}


def dense_up_outputs(model, val: np.ndarray, seq_len: int, tokens: np.ndarray, layers, windows: int,
                     mode: str) -> tuple[dict, np.ndarray]:
    """({layer: [n, d_ff] W_up x per found token}, the found tokens in the order of ``tokens``). The FFN inputs
    are reduced per token chunk by chunk (first occurrence, or sum for the mean); W_up is applied at the end."""
    bad = {i: type(model.blocks[i].ffn).__name__ for i in layers if not hasattr(model.blocks[i].ffn, "w_up")}
    if bad:
        raise ValueError(f"layers {list(bad)} of the dense workdir have no W_up ({', '.join(set(bad.values()))})")
    n = min(windows, len(val) // seq_len)
    if n < 1:
        raise ValueError(f"the held-out split has {len(val)} tokens, fewer than one window of {seq_len}")
    ids = np.asarray(val[:n * seq_len], np.int64).reshape(n, seq_len)
    slot = np.full(max(int(ids.max()), int(tokens.max())) + 1, -1)
    slot[tokens] = np.arange(len(tokens))
    count, acc = np.zeros(len(tokens)), {}
    for b, chunk in zip(range(0, n, 16), ffn_input_chunks(model, ids, layers, 16)):
        s_N = slot[ids[b:b + 16].reshape(-1)]
        keep = s_N >= 0
        h = {i: x.reshape(-1, x.shape[-1])[keep] for i, x in chunk.items()}
        s_N = s_N[keep]
        first, at = np.unique(s_N, return_index=True)
        new = count[first] == 0
        for i in layers:
            acc.setdefault(i, np.zeros((len(tokens), h[i].shape[-1])))
            if mode == "first":
                acc[i][first[new]] = h[i][at[new]]
            else:
                np.add.at(acc[i], s_N, h[i])
        count += np.bincount(s_N, minlength=len(tokens))
    found = count > 0
    div = 1.0 if mode == "first" else count[found, None]
    return {i: (acc[i][found] / div) @ np.asarray(model.blocks[i].ffn.w_up[...], np.float64)
            for i in layers}, np.asarray(tokens)[found]


def angular_spread(workdir, dense_workdir=None, top_n: int = 1000, out=None, step=None, dense_step=None,
                   dense_x: str = "first", dense_windows: int = 1024) -> dict:
    """Writes ``angular_spread.json/.md`` and ``angular_layer{i}.png`` to ``out``; returns the summary."""
    if dense_x not in ("first", "mean"):
        raise ValueError(f"dense_x={dense_x!r}: use 'first' or 'mean'")
    if top_n < 2:
        raise ValueError(f"top_n={top_n} must be at least 2 (pairs of tokens)")
    workdir = Path(workdir)
    cfg = load_run_config(workdir)
    layers = table_layers(workdir, cfg)
    corpus = open_workdir_corpus(workdir, cfg)
    freq = sum(np.bincount(np.asarray(s, np.int64), minlength=cfg.model.vocab_size) for s in corpus.train.shards())
    tokens = np.argsort(-freq, kind="stable")[:min(top_n, int(np.count_nonzero(freq)))]
    summary = {"workdir": str(workdir), "top_n": top_n, "frequency_source": "training split of the STEM workdir",
               "random_p95_abs": 1.96 / cfg.model.d_ff ** 0.5, "layers": {}}
    dense = {}
    if dense_workdir is not None:
        dense_workdir = Path(dense_workdir)
        dcfg = load_run_config(dense_workdir)
        bad = [i for i in layers if i >= dcfg.model.n_layers]
        if bad:
            raise ValueError(f"the dense workdir has {dcfg.model.n_layers} layers; STEM layers {bad} do not exist")
        dcorpus = open_workdir_corpus(dense_workdir, dcfg)
        if _fingerprint(dcorpus.tokenizer) != _fingerprint(corpus.tokenizer):
            raise ValueError(f"{dense_workdir} uses a different tokenizer from {workdir}: token ids do not correspond")
        dmodel, dstep = restore_model(dense_workdir, dcfg, dense_step)
        L = dcfg.model.seq_len
        dense, found = dense_up_outputs(dmodel, dcorpus.val.read(0, dense_windows * L), L, tokens, layers, dense_windows, dense_x)
        summary.update(dense_workdir=str(dense_workdir), dense_step=dstep, dense_x=dense_x,
                       dense_source=f"held-out split, first {min(dense_windows, len(dcorpus.val) // L)} windows of "
                                    f"{L} tokens",
                       dropped_tokens=int(len(tokens) - len(found)))
        tokens = found
    model, summary["step"] = restore_model(workdir, cfg, step)
    summary["tokens"] = int(len(tokens))
    out = Path(out) if out else workdir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    for i in layers:
        rows = np.asarray(model.blocks[i].ffn.table[...], np.float32)[model.stored_rows(tokens)]
        cos = {"STEM rows U[t]": pairwise_cosines(rows)}
        entry = {"stem": cosine_stats(cos["STEM rows U[t]"])}
        if dense:
            cos["dense W_up x"] = pairwise_cosines(dense[i])
            entry["dense"] = cosine_stats(cos["dense W_up x"])
        entry["png"] = str(out / f"angular_layer{i}.png")
        _histogram(cos, entry["png"], f"layer {i}: pairwise cosine, {len(tokens)} most frequent tokens")
        summary["layers"][str(i)] = entry
    (out / "angular_spread.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "angular_spread.md").write_text(angular_markdown(summary))
    return summary


def angular_markdown(s: dict) -> str:
    lines = [f"# Angular spread ({s['workdir']}, step {s['step']})", "",
             f"{s['tokens']} most frequent tokens ({s['frequency_source']}); all pairs i < j.", ""]
    if "dense_workdir" in s:
        lines += [f"Dense: W_up x of {s['dense_workdir']} (step {s['dense_step']}), x = FFN input at the "
                  f"token's {'first occurrence' if s['dense_x'] == 'first' else 'occurrences (mean)'} in the "
                  f"{s['dense_source']}; {s['dropped_tokens']} tokens not found there were dropped.", ""]
    kinds = [k for k in ("stem", "dense") if k in next(iter(s["layers"].values()))]
    name = {"stem": "STEM U[t]", "dense": "dense W_up x"}
    lines += ["| layer | " + " | ".join(f"{name[k]} P95 \\|cos\\| | mean | std" for k in kinds) + " |",
              "|---|" + "---|---|---|" * len(kinds)]
    lines += [f"| {i} | " + " | ".join(f"{e[k]['p95_abs']:.4f} | {e[k]['mean']:.4f} | {e[k]['std']:.4f}" for k in kinds)
              + " |" for i, e in s["layers"].items()]
    return "\n".join(lines + ["", f"Random directions in d_ff dimensions: P95 |cos| ~ 1.96/sqrt(d_ff) = "
                               f"{s['random_p95_abs']:.4f}; {PAPER_P95}."]) + "\n"


def _save(fig: Figure, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _histogram(cos: dict, path: str, title: str) -> None:
    allv = np.concatenate(list(cos.values()))
    bins = np.linspace(allv.min(), allv.max(), 121)
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for name, c in cos.items():
        ax.hist(c, bins=bins, density=True, alpha=0.55,
                label=f"{name}: P95 |cos| {np.percentile(np.abs(c), 95):.3f}, mean {c.mean():.3f}")
    ax.set(xlabel="cosine similarity", ylabel="density", title=title)
    ax.legend(fontsize=8)
    _save(fig, path)


def activated_vs_context(workdir=None, config=None, text_file=None, max_len=None, windows: int = 32, seed: int = 0,
                         out=None) -> dict:
    """Writes ``activated_params.json/.md/.png``. Reads a workdir's config.json and tokenizer.json (no weights),
    or a ``config`` (a Config or a preset file) whose data section gives the tokenizer and held-out split."""
    if (workdir is None) == (config is None):
        raise ValueError("give exactly one of a workdir or a config")
    if workdir is not None:
        cfg, where = load_run_config(workdir), Path(workdir)
    else:
        cfg = validate(cli.load_config_file(config) if isinstance(config, (str, Path)) else config)
        where = Path(config if isinstance(config, (str, Path)) else "config")
    layers = table_layers(where, cfg)
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise FileNotFoundError(f"--text_file {path} is not a readable file")
        tok = load_tokenizer(workdir) if workdir is not None else open_workdir_corpus(where, cfg).tokenizer
        tokens, source = np.asarray(corpus_lib.encode_text(tok, path.read_text(encoding="utf-8", errors="replace")).ids), str(path)
    else:
        val = open_workdir_corpus(where, cfg).val
        tokens, source = val.read(0, HELD_OUT_TOKENS), "held-out split"
    max_len = max_len or cfg.model.seq_len
    if max_len < 2 or max_len > len(tokens):
        raise ValueError(f"max_len={max_len} must be in [2, {len(tokens)}] (the text's token count)")
    rows = unique_counts(tokens, context_lengths(max_len), windows, seed)
    S, F = len(layers), cfg.model.d_ff
    for r in rows:
        r["activated_params"] = float(activated_params(S, F, r["L_uniq"]))
        r["table_fraction"] = r["L_uniq"] / cfg.model.vocab_size
    fit = heaps_fit([r["L"] for r in rows], [r["L_uniq"] for r in rows])
    res = {"source": str(where), "text": source, "tokens": int(len(tokens)), "stem_layers": list(layers),
           "d_ff": F, "vocab_size": cfg.model.vocab_size, "windows": windows, "seed": seed, "lengths": rows,
           "heaps": fit}
    out = Path(out) if out else (Path(workdir) / "analysis" if workdir is not None else Path("analysis"))
    out.mkdir(parents=True, exist_ok=True)
    res["png"] = str(out / "activated_params.png")
    _activated_plot(res, res["png"])
    (out / "activated_params.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "activated_params.md").write_text(activated_markdown(res))
    return res


def activated_markdown(r: dict) -> str:
    h = r["heaps"]
    lines = [f"# Activated STEM parameters vs context ({r['source']})", "",
             f"Text: {r['text']} ({r['tokens']:,} tokens); up to {r['windows']} windows per length. "
             f"|S| = {len(r['stem_layers'])} STEM layers {r['stem_layers']}, d_ff = {r['d_ff']}.", "",
             f"Heaps fit L_uniq = K L^beta: K = {h['K']:.3f}, beta = {h['beta']:.3f}, R^2 = {h['r2']:.4f}.", "",
             "| L | L_uniq | std | activated STEM params | share of a table's rows |", "|---|---|---|---|---|"]
    lines += [f"| {x['L']} | {x['L_uniq']:.2f} | {x['L_uniq_std']:.2f} | {x['activated_params']:,.0f} | "
              f"{x['table_fraction']:.4f} |" for x in r["lengths"]]
    return "\n".join(lines) + "\n"


def _activated_plot(r: dict, path: str) -> None:
    L = np.array([x["L"] for x in r["lengths"]], np.float64)
    U = np.array([x["L_uniq"] for x in r["lengths"]])
    h, per = r["heaps"], len(r["stem_layers"]) * r["d_ff"]
    fig = Figure(figsize=(10, 4))
    a, b = fig.subplots(1, 2)
    a.loglog(L, U, "o", label="L_uniq (mean over windows)")
    a.loglog(L, h["K"] * L ** h["beta"], "-", label=f"fit {h['K']:.2f} L^{h['beta']:.3f} (R² {h['r2']:.3f})")
    a.loglog(L, L, ":", color="gray", label="L_uniq = L")
    a.set(xlabel="context length L (tokens)", ylabel="distinct tokens L_uniq", title="Heaps' law")
    b.loglog(L, per * U, "o", label="|S|·d_ff·L_uniq")
    b.loglog(L, per * h["K"] * L ** h["beta"], "-", label="from the fit")
    b.set(xlabel="context length L (tokens)", ylabel="activated STEM parameters", title="activated STEM params")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    _save(fig, path)


COMMANDS = {"angular": "pairwise cosine of STEM rows (and dense W_up x) per STEM layer",
            "activated": "distinct tokens and activated STEM params vs context length"}


def _define(fv: flags.FlagValues, command: str) -> None:
    flags.DEFINE_string("out", None, "Output folder (default <workdir>/analysis).", flag_values=fv)
    if command == "angular":
        flags.DEFINE_string("workdir", None, "A STEM workdir.", required=True, flag_values=fv)
        flags.DEFINE_string("dense_workdir", None, "The dense twin (optional).", flag_values=fv)
        flags.DEFINE_integer("top_n", 1000, "Most frequent training tokens.", flag_values=fv)
        flags.DEFINE_enum("dense_x", "first", ("first", "mean"), "W_up x at a token's first occurrence in the "
                          "held-out windows, or the mean over all.", flag_values=fv)
        flags.DEFINE_integer("dense_windows", 1024, "Held-out windows of seq_len the dense model reads.", flag_values=fv)
        flags.DEFINE_integer("step", None, "Checkpoint step of the STEM workdir (default: the latest).", flag_values=fv)
        flags.DEFINE_integer("dense_step", None, "Checkpoint step of the dense workdir.", flag_values=fv)
        return
    flags.DEFINE_string("workdir", None, "A workdir (only config.json and tokenizer.json are read).", flag_values=fv)
    flags.DEFINE_string("config", None, "A preset file, instead of --workdir.", flag_values=fv)
    flags.DEFINE_string("text_file", None, "Text to analyse (default: the held-out split).", flag_values=fv)
    flags.DEFINE_integer("max_len", None, "Longest context (default model.seq_len).", flag_values=fv)
    flags.DEFINE_integer("windows", 32, "Windows per length (random offsets).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the window offsets.", flag_values=fv)


def main(argv=None) -> None:
    command, f = cli.parse_command(argv, "python -m stem_jax.analysis", __doc__.split("\n\n")[0], _define, COMMANDS)
    if command == "angular":
        s = cli.run_user_errors(angular_spread, f.workdir, f.dense_workdir, f.top_n, f.out, f.step, f.dense_step,
                                f.dense_x, f.dense_windows)
        print(angular_markdown(s), end="")
    else:
        r = cli.run_user_errors(activated_vs_context, f.workdir, f.config, f.text_file, f.max_len, f.windows,
                                f.seed, f.out)
        print(activated_markdown(r), end="")


if __name__ == "__main__":
    main()
