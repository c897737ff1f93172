"""Collective bytes of the STEM table lookup (forward + backward), read from the compiled HLO.

    python benchmarks/lookup_comm.py                                  # 8 fake CPU devices; prints the table
    python benchmarks/lookup_comm.py --out benchmarks/lookup_comm.md  # also writes it there

For each mesh and lookup mode, compiles ``(table, ids, cot) -> (rows, d table)`` (``stem.lookup`` and its
VJP) with the shardings of ``sharding.RULES``, sums the collectives of ``compiled.as_text()`` and compares
them with the minimum traffic of moving the rows once: ``tokens x d_ff x bytes x (N-1)/N`` per device.
Nothing runs on the devices: the figures are what XLA's partitioner planned, not measured traffic.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import flags

from stem_jax import cli, config, sharding, stem

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


def lookup_hlo(mesh: jax.sharding.Mesh, mode: str) -> str:
    """Optimized HLO of the lookup's forward and its VJP (the table gradient), sharded by the rules."""
    def fwd_bwd(table, ids, cot):
        rows, pull = jax.vjp(lambda t: stem.lookup(t, ids, mode), table)
        return rows, pull(cot)[0]  # rows are returned so XLA cannot drop the forward

    table = sharding.named(mesh, ("stem_vocab", "stem_dff"))
    rows = sharding.named(mesh, ("batch", "length", "stem_dff"))
    fn = jax.jit(fwd_bwd, in_shardings=(table, sharding.named(mesh, ("batch", "length")), rows),
                 out_shardings=(rows, table))
    with jax.set_mesh(mesh):
        n_rows = sharding.padded_rows(V, mesh=mesh)
        args = (jax.ShapeDtypeStruct((n_rows, F), jnp.float32), jax.ShapeDtypeStruct((B, L), jnp.int32),
                jax.ShapeDtypeStruct((B, L, F), jnp.float32))
        return fn.lower(*args).compile().as_text()


def _define(fv: flags.FlagValues, _command) -> None:
    flags.DEFINE_string("out", "", "Also write the markdown table to this file (default: print it only).",
                        flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    _, args = cli.parse_command(argv, "python benchmarks/lookup_comm.py", __doc__.splitlines()[0], _define)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 8)  # before the first jax.devices()

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
        "means both directions are at that figure. It is not an information-theoretic floor: an all-to-all "
        "sending only the owned rows would move ~1/N of it (the masked rows of the reduce-scatter are zeros).",
        f"Collective kinds absent from every program: {', '.join(k for k in KINDS if k not in kinds) or 'none'}.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
