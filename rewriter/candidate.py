"""The format-free words every reader uses to describe a group candidate to the planner.

    source ─ ChannelRead(axis, start, stop) per branch ─ branch layers (gconv_rewrite.plan) ─ concat

A reader (one per format: ``passes/*/fuse_*.py``) finds where each branch reads its channels
(``ChannelRead``), hands the branches to ``gconv_rewrite.plan``, and says why a candidate is none
(``NotACandidate``: nothing to report) or cannot fuse (``Refused``, from ``gconv_rewrite.reasons``: a
stable code and the sentence the user reads).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gconv_rewrite.reasons import NotACandidate, Refused  # noqa: F401  (the readers' words, kept here)


@dataclass
class ChannelRead:
    """A tensor that holds channels ``[start, stop)`` of ``source`` along ``axis``.

    ``source`` and ``reader`` are the format's own handles (an onnx-ir value and node, a TF
    tensor name and NodeDef, a Keras tensor reference and call). ``start``/``stop`` are None
    when they depend on a channel count nothing records."""

    source: Any
    reader: Any  # the Split / Slice / GetItem that reads the range
    axis: int  # as written (may be negative)
    start: int | None
    stop: int | None
    open_end: bool = False  # a slice "to the end": its stop is the source's channel count


def resolve_sizes(sizes: Sequence[int], total: int | None) -> list[int] | None:
    """Split sizes with one ``-1`` ("the rest", as TF and Keras write it) resolved against the
    axis length ``total``; None when a ``-1`` cannot be resolved (unknown length, several)."""
    sizes = [int(s) for s in sizes]
    if -1 not in sizes:
        return sizes
    if total is None or sizes.count(-1) > 1:
        return None
    sizes[sizes.index(-1)] = total - (sum(sizes) + 1)
    return sizes


def ranges_of(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``[(start, stop), …]`` of consecutive parts of the given sizes."""
    ranges, start = [], 0
    for size in sizes:
        ranges.append((start, start + size))
        start += size
    return ranges
