"""The collectives of a compiled XLA program, read from its HLO text, with their bytes.

What crosses the wire in a sharded step (the communication benchmark compares it with an
analytic model): one record per collective instruction, with its result size and the bytes
each device sends under a bandwidth-optimal ring algorithm.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple


class Collective(NamedTuple):
    """One collective of a compiled XLA program.

    Attributes:
      kind: ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all`` or
        ``collective-permute``.
      shape: its result shape(s) as written in the HLO, e.g. ``"f32[16,8]"``.
      result_bytes: bytes of the result (the gathered array for an all-gather, the shard
        for a reduce-scatter).
      group_size: devices per replica group (1 if the HLO does not say).
      wire_bytes: bytes each device sends with a bandwidth-optimal (ring) algorithm:
        ``2 (n-1)/n S`` for an all-reduce of ``S`` bytes, ``(n-1)/n S`` for an all-gather
        with result ``S`` or an all-to-all, ``(n-1) s`` for a reduce-scatter with result
        ``s``, ``S`` for a permute.
    """

    kind: str
    shape: str
    result_bytes: int
    group_size: int
    wire_bytes: float


_COLLECTIVE_RE = re.compile(
    r"=\s*(?P<shape>\(.*?\)|[\w]+\[[\d,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<kind>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?P<start>-start)?\("
)
_ARRAY_RE = re.compile(r"(\w+)\[([\d,]*)\]")
_GROUPS_IOTA_RE = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_GROUPS_LIST_RE = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_GROUPS_MESH_RE = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_PARTITIONS_RE = re.compile(r"num_partitions=(\d+)")
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1,
}  # fmt: skip


def _array_bytes(text: str) -> list[int]:
    out = []
    for dtype, dims in _ARRAY_RE.findall(text):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        out.append(n * _DTYPE_BYTES.get(dtype, 4))
    return out


def _group_size(line: str, default: int) -> int:
    """Devices per replica group, in any of the HLO spellings of ``replica_groups``."""
    m = _GROUPS_MESH_RE.search(line)  # mesh['a'=4,'b'=2] {'a'}
    if m:
        sizes = {k.strip("'\" "): int(v) for k, v in re.findall(r"([^,=]+)=(\d+)", m.group(1))}
        axes = [a.strip("'\" ") for a in m.group(2).split(",") if a.strip()]
        return math.prod(sizes.get(a, 1) for a in axes)
    m = _GROUPS_IOTA_RE.search(line)  # [num_groups,group_size]<=[n]
    if m:
        return int(m.group(2))
    m = _GROUPS_LIST_RE.search(line)  # {{0,1,2,3},{4,5,6,7}}
    if m:
        return len([x for x in m.group(1).split(",") if x])
    return default  # replica_groups={}: one group of all devices


def hlo_collectives(compiled: Any) -> list[Collective]:
    """Lists the collectives of a compiled program, with their sizes.

    Args:
      compiled: ``jax.jit(f).lower(...).compile()``, or its ``as_text()``.

    Returns:
      One :class:`Collective` per collective instruction (async ``-start``/``-done`` pairs
      count once).

    Example:
      >>> c = jax.jit(f, in_shardings=..., out_shardings=...).lower(x).compile()
      >>> sum(c.wire_bytes for c in hlo_collectives(c) if c.kind == "all-gather")
    """
    text = compiled if isinstance(compiled, str) else compiled.as_text()
    parts = _PARTITIONS_RE.search(text)
    partitions = int(parts.group(1)) if parts else 1
    out = []
    for line in text.splitlines():
        m = _COLLECTIVE_RE.search(line)
        if not m:
            continue
        kind, shape = m.group("kind"), m.group("shape")
        sizes = _array_bytes(shape)
        if m.group("start") and shape.startswith("(") and kind != "all-reduce":
            sizes = sizes[len(sizes) // 2 :]  # (operands, results) of an async start
        size = sum(sizes)
        n = max(_group_size(line, default=partitions), 1)
        if kind == "all-reduce":
            wire = 2 * (n - 1) / n * size
        elif kind == "reduce-scatter":
            wire = (n - 1) * size
        elif kind == "collective-permute":
            wire = float(size)
        else:
            wire = (n - 1) / n * size
        out.append(Collective(kind, shape, size, n, wire))
    return out


def collective_bytes(compiled: Any) -> dict[str, float]:
    """Per-device wire bytes of a compiled program by collective kind (see :class:`Collective`)."""
    totals: dict[str, float] = {}
    for c in hlo_collectives(compiled):
        totals[c.kind] = totals.get(c.kind, 0.0) + c.wire_bytes
    return totals
