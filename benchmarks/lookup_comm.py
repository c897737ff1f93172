"""Collective bytes of the STEM table lookup and of the sparse optimizer's table step, from the compiled HLO.

    python benchmarks/lookup_comm.py                                  # prints the tables (about 3 minutes)
    python benchmarks/lookup_comm.py --out benchmarks/lookup_comm.md  # also writes them there

1. For each 8-device mesh and lookup mode, compiles ``(table, ids, cot) -> (rows, d table)`` (``stem.lookup``
   and its VJP) with the shardings of ``sharding.RULES`` and sums the collectives of ``compiled.as_text()``.
2. Scaling in N: the lookup and the table half of the sparse step at N = 8 ... 64 fake devices (one process
   each) at a fixed per-device batch: wire bytes, largest collective and temp memory per device, against
   the minimum ``2 x local tokens x d_ff x bytes x (N-1)/N`` of moving every local row once each way.
3. Real batches: the exchange's routing rule (``exchange.route``) applied in numpy to batches of the embedded
   corpus, for both row layouts and several capacities: how many rounds it needs and the rows it moves.
Nothing runs on the devices: the figures are what XLA's partitioner planned, not measured traffic.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from flax import nnx

from stem_jax import cli, config, corpus, exchange, sharding, sparse, stem
from stem_jax.config import TrainConfig

B, L, V, F = 16, 128, 8192, 512  # the tiny preset's batch x length, a vocab of 8192, d_ff 512; float32
MESHES = ((8, 1, 1), (2, 4, 1), (4, 1, 2))  # (data, fsdp, tensor)
KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
BITS = {"pred": 8, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16, "bf16": 16, "s32": 32, "u32": 32,
        "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64, "c128": 128, "s4": 4, "u4": 4}
BITS.update({t: 8 for t in ("f8e4m3fn", "f8e5m2", "f8e4m3", "f8e4m3fnuz", "f8e5m2fnuz", "f8e4m3b11fnuz")})

# "%name = SHAPE op(" where op is a collective, its async "-start" form counted once ("-done(" never matches).
# The shape is one array token or a parenthesised tuple, so a collective's name elsewhere on a line never matches.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\(.*?\)|\S+)\s(" + "|".join(KINDS) + r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([<=\d,]*)\]")  # f32[2,128,512]; layouts {2,1,0} are ignored


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op. ``result_bytes``: size of its result buffer on ONE device (an all-gather's gathered
    output, a reduce-scatter's scattered shard, an all-reduce's full buffer). ``wire_bytes``: the bytes one
    device sends with a ring / bidirectional-exchange algorithm over a group of ``group`` devices:
    all-gather and all-to-all (N-1)/N x result, reduce-scatter (N-1) x result (= (N-1)/N of its input),
    all-reduce 2 (N-1)/N x result, collective-permute the result if the device sends to another one."""
    kind: str
    result_bytes: int
    group: int
    wire_bytes: float
    integer: bool  # only integer / pred arrays: the ids and masks, not rows


def _split_top(tuple_text: str) -> list[str]:
    """'(a, (b, c))' -> ['a', '(b, c)']."""
    parts, depth, start = [], 0, 0
    inner = tuple_text.strip()[1:-1]
    for i, ch in enumerate(inner):
        depth += (ch in "({[") - (ch in ")}]")
        if ch == "," and depth == 0:
            parts.append(inner[start:i].strip())
            start = i + 1
    return parts + [inner[start:].strip()]


def _arrays(shape_text: str) -> list[tuple[str, int]]:
    """(dtype, bytes) of every array in a shape; unknown element types (token[]) count 0."""
    return [(t, math.prod(int(d.lstrip("<=")) for d in dims.split(",") if d) * BITS.get(t, 0) // 8)
            for t, dims in _ARRAY.findall(shape_text)]


def _group_size(line: str, n_partitions: int) -> int:
    """Devices per replica group, from the three formats XLA prints."""
    if m := re.search(r"replica_groups=\{\{([\d,]*)\}", line):  # {{0,2,4,6},{1,3,5,7}}
        return len(m.group(1).split(","))
    if m := re.search(r"replica_groups=\[([\d,]+)\]<=", line):  # iota: [groups, size]<=[8]
        return int(m.group(1).split(",")[-1])
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line):  # mesh['a'=4,'b'=2] {'a'}
        sizes = {k: int(v) for k, v in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
        axes = re.findall(r"'(\w+)'(?::\(\d+\)(\d+))?", m.group(2))  # sub-axis 'a':(1)2 (assumed format)
        return math.prod(int(sub or sizes[name]) for name, sub in axes)
    return n_partitions  # replica_groups={} : every device


def collectives(hlo_text: str) -> list[Collective]:
    """The collectives of an optimized HLO module, in text order (nested computations included)."""
    n = int(m.group(1)) if (m := re.search(r"num_partitions=(\d+)", hlo_text)) else 1
    out = []
    for line in hlo_text.splitlines():
        if not (m := _INSTR.match(line)):
            continue
        shape, kind, start = m.groups()
        # An async "-start" result is (operands, output, context...) except for all-reduce-start: keep the output.
        if start and kind != "all-reduce" and shape.startswith("("):
            shape = _split_top(shape)[1]
        arrays = _arrays(shape)
        size = sum(b for _, b in arrays)
        if kind == "collective-permute":
            pairs = re.findall(r"\{(\d+),(\d+)\}", line.split("source_target_pairs=")[-1])
            group = len(pairs)
            wire = size * sum(s != t for s, t in pairs) / max(1, len(pairs))  # self-pairs move nothing
        else:
            group = _group_size(line, n)
            wire = size * {"all-reduce": 2 * (group - 1) / group, "reduce-scatter": group - 1}.get(
                kind, (group - 1) / group)
        out.append(Collective(kind, size, group, wire, all(t == "pred" or t[0] in "su" for t, _ in arrays)))
    return out


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Result bytes per device (see ``Collective``) summed per collective kind; every kind is present."""
    total = dict.fromkeys(KINDS, 0)
    for c in collectives(hlo_text):
        total[c.kind] += c.result_bytes
    return total


def lookup_program(mesh: jax.sharding.Mesh, mode: str, batch: int = B, length: int = L, vocab: int = V,
                   d_ff: int = F, dtype=jnp.float32, capacity: float = config.EXCHANGE_CAPACITY):
    """The compiled lookup forward and its VJP (the table gradient), sharded by the rules; rows in ``dtype``."""
    def fwd_bwd(table, ids, cot):
        rows, pull = jax.vjp(lambda t: stem.lookup(t, ids, mode, dtype, capacity), table)
        return rows, pull(cot)[0]  # rows are returned so XLA cannot drop the forward

    table = sharding.named(mesh, ("stem_vocab", "stem_dff"))
    rows = sharding.named(mesh, ("batch", "length", "stem_dff"))
    fn = jax.jit(fwd_bwd, in_shardings=(table, sharding.named(mesh, ("batch", "length")), rows),
                 out_shardings=(rows, table))
    with jax.set_mesh(mesh):
        n_rows = sharding.padded_rows(vocab, mesh=mesh)
        args = (jax.ShapeDtypeStruct((n_rows, d_ff), jnp.float32), jax.ShapeDtypeStruct((batch, length), jnp.int32),
                jax.ShapeDtypeStruct((batch, length, d_ff), dtype))
        return fn.lower(*args).compile()


def lookup_hlo(mesh: jax.sharding.Mesh, mode: str, **shape) -> str:
    """Optimized HLO text of ``lookup_program``."""
    return lookup_program(mesh, mode, **shape).as_text()


def largest_collective(n_devices: int, mode: str, local_batch: int = 2, length: int = 128, vocab: int = 8192,
                       d_ff: int = 64) -> tuple[int, int]:
    """(largest collective result in bytes, 2 x the local batch's float32 rows in bytes) of the lookup's
    forward + backward on a (n, 1, 1) mesh at a fixed per-device batch."""
    mesh = sharding.make_mesh((n_devices, 1, 1), jax.devices()[:n_devices])
    hlo = lookup_hlo(mesh, mode, batch=local_batch * n_devices, length=length, vocab=vocab, d_ff=d_ff)
    return max(c.result_bytes for c in collectives(hlo)), 2 * local_batch * length * d_ff * 4


def sparse_table_program(mesh: jax.sharding.Mesh, path: str, batch: int, length: int, vocab: int, d_ff: int,
                         capacity: float = config.EXCHANGE_CAPACITY):
    """The compiled table half of a sparse-optimizer step: fetch the batch's rows and apply gradients to
    them (a stand-in gradient, ``rows / 2``, so no backbone runs). ``path``: "exchange" (``steps.sparse_step``:
    per-device dedup, rows fetched from and gradients returned to their owners) or "replicated" (the step
    before it: the global batch deduplicated, [U, d_ff] rows on every device, ``sparse.update``)."""
    t = TrainConfig()

    def make():
        table = nnx.Param(jnp.zeros((sharding.padded_rows(vocab, mesh=mesh), d_ff)),
                          logical_axes=("stem_vocab", "stem_dff"))
        tables = nnx.State({"ffn": {"table": table}})
        return tables, sparse.init_state(tables)

    def step(tables, state, rows_BxL):
        lr = jnp.float32(1e-3)
        if path == "exchange":
            rows, _, route, asked_V = sparse.fetch_rows(tables, rows_BxL, capacity)
            return sparse.exchange_update(tables, state, route, asked_V, [r / 2 for r in rows], lr, t, capacity)[:2]
        n_rows = sparse.table_list(tables)[0].shape[0]
        uniq_U, _ = sparse.dedup(rows_BxL, sparse.unique_size(rows_BxL.size, n_rows), n_rows)
        rows = [stem.lookup(tb, uniq_U[None], "shard_map")[0] for tb in sparse.table_list(tables)]
        return sparse.update(tables, state, uniq_U, [r / 2 for r in rows], lr, t)[:2]

    with jax.set_mesh(mesh):
        abstract = jax.eval_shape(make)
        shardings = sharding.tree_shardings(mesh, abstract)
        fn = jax.jit(step, in_shardings=(*shardings, sharding.named(mesh, ("batch", "length"))),
                     out_shardings=shardings)
        return fn.lower(*abstract, jax.ShapeDtypeStruct((batch, length), jnp.int32)).compile()


# ---- scaling in N at a fixed per-device batch (each N compiles in its own process: one device count each) ----

SCALE_N = (8, 16, 32, 64)
LOCAL_B, LOCAL_L = 2, 128  # per-device batch
SCALE_SHAPES = ((8192, 512, "float32"), (8192, 8192, "bfloat16"))  # (vocab, d_ff, row dtype)


SCALE_CAPACITY = 0.5  # capacity * local tokens / N is a whole number of slots at every N here
LONG_B, LONG_L = 2, 4096


def scaling_row(n: int) -> list[dict]:
    """Per-device figures of every program at ``n`` devices (mesh (n, 1, 1), batch 2 x 128 per device)."""
    mesh = sharding.make_mesh((n, 1, 1), jax.devices()[:n])
    out = []
    for vocab, d_ff, dtype in SCALE_SHAPES:
        for mode, cap in (("exchange", SCALE_CAPACITY), ("exchange", config.EXCHANGE_CAPACITY), ("shard_map", 0)):
            if cap == config.EXCHANGE_CAPACITY and dtype != "float32":
                continue
            c = lookup_program(mesh, mode, LOCAL_B * n, LOCAL_L, vocab, d_ff, jnp.dtype(dtype), cap or 1.0)
            out.append(_figures(c, n, "lookup", f"exchange, capacity {cap}" if cap else mode, vocab, d_ff, dtype))
    for path in ("exchange", "replicated"):
        c = sparse_table_program(mesh, path, LOCAL_B * n, LOCAL_L, 8192, 512, SCALE_CAPACITY)
        name = f"exchange, capacity {SCALE_CAPACITY}" if path == "exchange" else path
        out.append(_figures(c, n, "sparse table step", name, 8192, 512, "float32"))
    # The paper's per-device batch (512 x 4096 over 256 chips) at the default capacity.
    c = lookup_program(mesh, "exchange", LONG_B * n, LONG_L, 8192, 512, jnp.float32, config.EXCHANGE_CAPACITY)
    out.append(_figures(c, n, f"lookup, {LONG_B} x {LONG_L} per device", f"exchange, capacity "
                        f"{config.EXCHANGE_CAPACITY}", 8192, 512, "float32", LONG_B * LONG_L))
    return out


def _figures(compiled, n: int, program: str, mode: str, vocab: int, d_ff: int, dtype: str,
             tokens: int = LOCAL_B * LOCAL_L) -> dict:
    cs = collectives(compiled.as_text())
    width = jnp.dtype(dtype).itemsize
    return {"n": n, "program": program, "mode": mode, "vocab": vocab, "d_ff": d_ff, "dtype": dtype,
            "wire": sum(c.wire_bytes for c in cs), "largest": max((c.result_bytes for c in cs), default=0),
            "temp": compiled.memory_analysis().temp_size_in_bytes,
            "minimum": 2 * tokens * d_ff * width * (n - 1) / n, "local_rows": tokens * d_ff * width}


def scaling_table(rows: list[dict]) -> list[str]:
    lines = ["| program | mode | table, rows | N | est. wire B / device | wire / minimum | largest collective B "
             "| largest / local rows | temp B / device |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['program']} | {r['mode']} | {r['vocab']} x {r['d_ff']}, {r['dtype']} | {r['n']} "
                     f"| {r['wire']:,.0f} | {r['wire'] / r['minimum']:.3f} | {r['largest']:,} "
                     f"| {r['largest'] / r['local_rows']:.2f} | {r['temp']:,} |")
    lines.append("")
    groups = {}
    for r in rows:
        groups.setdefault((r["program"], r["mode"], r["vocab"], r["d_ff"], r["dtype"]), []).append(r)
    lines += ["| program | mode | table, rows | wire max/min over N | temp max/min over N | result bytes max/min |",
              "|---|---|---|---|---|---|"]
    for (prog, mode, vocab, d_ff, dtype), rs in groups.items():
        ratio = lambda k: max(r[k] for r in rs) / max(1, min(r[k] for r in rs))
        lines.append(f"| {prog} | {mode} | {vocab} x {d_ff}, {dtype} | {ratio('wire'):.3f} | {ratio('temp'):.3f} "
                     f"| {ratio('largest'):.3f} |")
    return lines


# ---- real batches: how many rounds the exchange needs, from the routing rule applied in numpy ----

def real_batches(tokens: np.ndarray, vocab: int, owners: int, local_b: int, length: int, capacity: float,
                 layout: str, rng: np.random.Generator, trials: int = 20) -> dict:
    """Route ``trials`` global batches of the corpus (``owners`` devices x ``local_b`` windows of ``length``)
    as ``exchange.route`` does; report the distinct fraction, per-owner balance and the rounds needed."""
    t = local_b * length
    v = sharding.padded_rows(vocab, mesh=None) // owners
    c = exchange.slots(t, owners, capacity)
    distinct, rounds, share = [], [], []
    for _ in range(trials):
        starts = rng.integers(0, len(tokens) - length, owners * local_b)
        batch = np.stack([tokens[s:s + length] for s in starts]).reshape(owners, t)
        stored = sharding.stored_rows(batch.astype(np.int64), vocab, layout)
        worst = 0
        for dev in range(owners):
            uniq = np.unique(stored[dev])
            counts = np.bincount(uniq // v, minlength=owners)
            distinct.append(len(uniq) / t)
            share.append(counts.max() / len(uniq))
            worst = max(worst, int(counts.max()))
        rounds.append(-(-worst // c))
    return {"distinct": float(np.mean(distinct)), "max_owner_share": float(np.mean(share)),
            "rounds_mean": float(np.mean(rounds)), "rounds_max": int(max(rounds)),
            "moved": float(np.mean(rounds)) * owners * c / t}


def real_table(tokens: np.ndarray, vocab: int) -> list[str]:
    lines = ["| per-device batch | owners | layout | capacity | distinct ids / tokens | largest owner's share of a "
             "device's distinct ids | rounds (mean, max) | rows moved / minimum |", "|---|---|---|---|---|---|---|---|"]
    for local_b, length in ((2, 128), (2, 4096)):
        for layout in ("contiguous", "spread"):
            for capacity in (0.25, 0.3, 0.5, 1.0):
                r = real_batches(tokens, vocab, 8, local_b, length, capacity, layout, np.random.default_rng(0))
                lines.append(f"| {local_b} x {length} | 8 | {layout} | {capacity} | {r['distinct']:.2f} "
                             f"| {r['max_owner_share']:.2f} | {r['rounds_mean']:.2f}, {r['rounds_max']} "
                             f"| {r['moved']:.2f} |")
    return lines


def _define(fv: flags.FlagValues, _command) -> None:
    flags.DEFINE_string("out", "", "Also write the markdown table to this file (default: print it only).",
                        flag_values=fv)
    flags.DEFINE_integer("scaling_row", 0, "Internal: print the JSON figures of this device count and exit.",
                         flag_values=fv)


def _scaling_rows() -> list[dict]:
    rows = []
    for n in SCALE_N:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        r = subprocess.run([sys.executable, __file__, f"--scaling_row={n}"], env=env, capture_output=True,
                           text=True, check=False)
        if r.returncode:
            raise SystemExit(f"error: the {n}-device compile failed: {r.stderr.strip().splitlines()[-1:]}")
        rows += json.loads(r.stdout.strip().splitlines()[-1])
    return rows


def main(argv: list[str] | None = None) -> None:
    _, args = cli.parse_command(argv, "python benchmarks/lookup_comm.py", __doc__.splitlines()[0], _define)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.scaling_row or 8)  # before the first jax.devices()
    if args.scaling_row:
        print(json.dumps(scaling_row(args.scaling_row)))
        return

    results = {}
    for shape in MESHES:
        mesh = sharding.make_mesh(shape)
        for mode in config.LOOKUP_MODES:
            results[shape, mode] = collectives(lookup_hlo(mesh, mode))
    kinds = [k for k in KINDS if any(c.kind == k for cs in results.values() for c in cs)]

    lines = [
        f"STEM lookup, forward + backward (`jax.vjp` of `stem.lookup`): table {V} x {F} float32, ids {B} x {L} "
        f"= {B * L} tokens, {jax.device_count()} fake CPU devices. Collectives of `compiled.as_text()` "
        "(planned by XLA, not measured). Bytes are per device.",
        "",
        "| mesh (data,fsdp,tensor) | mode | " + " | ".join(f"{k} result B" for k in kinds)
        + " | total result B | of which ids/masks: result B (wire B) | est. wire B / device | minimum B "
        "| wire / minimum |",
        "|---|---|" + "---|" * (len(kinds) + 5),
    ]
    for (shape, mode), cs in results.items():
        per_kind = {k: sum(c.result_bytes for c in cs if c.kind == k) for k in kinds}
        n = math.prod(shape[:2])  # devices that share a table copy = the batch shards (rules: stem_vocab ⊇ batch)
        minimum = B * L * (F // shape[2]) * 4 * (n - 1) / n  # each device holds d_ff / tensor columns
        wire = sum(c.wire_bytes for c in cs)
        ids = [c for c in cs if c.integer]
        ids_text = f"{sum(c.result_bytes for c in ids):,} ({sum(c.wire_bytes for c in ids):,.0f})"
        lines.append(f"| {shape} | {mode} | " + " | ".join(f"{per_kind[k]:,}" for k in kinds)
                     + f" | {sum(per_kind.values()):,} | {ids_text} | {wire:,.0f} | {minimum:,.0f} "
                     f"| {wire / minimum:.2f} |")
    lines += [
        "",
        "Conventions. *result B*: size of the op's result buffer on one device, summed over ops (an all-gather "
        "counts its gathered output, a reduce-scatter its scattered shard, an all-reduce its full buffer; an "
        "async `-start`/`-done` pair counts once). *est. wire B*: bytes one device sends under a ring over its "
        "replica group of N devices: all-gather (N-1)/N x result, reduce-scatter (N-1)/N x input = (N-1) x "
        "result, all-reduce 2(N-1)/N x result, collective-permute the result unless sent to itself. "
        "*of which ids/masks*: result bytes of the ops whose arrays are all integer or pred (the id all-gathers). "
        "*minimum*: `tokens x d_ff x 4 x (N-1)/N` with N the devices sharing one table copy (the batch shards) "
        "and d_ff the columns one device holds (d_ff / tensor); for the tensor = 1 meshes that is N = 8 and "
        "the full d_ff. It is the ring cost of one reduce-scatter (or all-gather) of the [tokens, d_ff] rows, "
        "i.e. moving every row once; forward + backward move rows one way and their cotangents back, so 2.00 "
        "means both directions are at that figure. The masked gather (`shard_map`) moves the whole batch's rows "
        "(most of them zeros); `exchange` moves its slots, `capacity` x the local tokens' rows each way, "
        "whatever the batch held (compiled shapes; real batches may need more rounds, see below). XLA:CPU "
        "upcasts bfloat16 collectives to float32 (convert fusions around the all-to-all), so bfloat16 rows "
        "below count 4 bytes each here.",
        f"Collective kinds absent from every program: {', '.join(k for k in KINDS if k not in kinds) or 'none'}.",
    ]
    train = corpus.load_corpus(config.DataConfig(), V, log=lambda *_: None).train
    tokens = train.read(0, len(train))  # 2.5M tokens: in memory
    lines += [
        "", "## Scaling in N at a fixed per-device batch",
        "",
        f"Each device holds {LOCAL_B} x {LOCAL_L} = {LOCAL_B * LOCAL_L} tokens; meshes (N, 1, 1) of fake CPU devices, "
        "each N compiled in its own process. *lookup*: `stem.lookup` forward + VJP. "
        "*sparse table step*: the table half of the sparse-optimizer step (`sparse_table_program`: fetch the "
        "rows, apply a stand-in gradient), table 8192 x 512 float32. *minimum*: `2 x local tokens x d_ff x "
        "bytes x (N-1)/N`, every local token's row moved once each way. *local rows*: `local tokens x d_ff x "
        "bytes`. Compiled, not run: the wire bytes are one round of the exchange; real batches need the "
        "rounds of the next table. Slots per owner round up (`ceil(capacity x 256 / N)`): at capacity 0.3 "
        "that is 10, 5, 3 and 2 slots for N = 8 ... 64, so its bytes grow where 0.3 x 256 / N is not whole.",
        "", *scaling_table(_scaling_rows()),
        "", "## Real batches: rounds of the exchange", "",
        f"The routing rule of `exchange.route` applied in numpy to 20 random global batches of the embedded "
        f"corpus (BPE {V}), 8 devices that own the rows and split the batch. *rows moved / minimum*: mean "
        "rounds x N x C / local tokens, the exchange's rows per direction relative to moving every local "
        "token's row once (the ids add 4 bytes per slot).", "",
        *real_table(np.asarray(tokens), V),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
