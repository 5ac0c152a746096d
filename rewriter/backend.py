"""The backend contract: what one model format gives the driver (``gconv_rewrite.api``).

    driver:  options → backend.load → passes (fuse | expand | target), each by backend.apply
             → backend.emit → staging → backend.save → backend.check → backend.verify
             → [conversion hops] → atomic commit → report

A backend is one format's code; it knows nothing of the CLI, of staging folders or of other
formats. It has one role or two (``BACKENDS``):

- the model-format role (``ModelFormat``): load, files read, stats, save, check, result;
- the rewriter role (``Rewriter``): the passes, ``apply``, ``emit``, ``verify``.

ONNX (``gconv_rewrite.passes.onnx.backend``), SavedModel (``gconv_rewrite.passes.tf.backend``) and Keras
(``gconv_rewrite.passes.keras.backend``) have both; TFLite (``gconv_rewrite.passes.tflite.backend``, an output format:
``--to tflite``) has the first only. ``--to`` is the driver handing what one backend wrote to a
``Conversion`` into another format (``ROUTES``), whose output it verifies against the original.
Backends are imported on first use, so an ONNX run never imports TensorFlow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gconv_rewrite import formats
from gconv_rewrite.errors import BadInput
from gconv_rewrite.report import ModelStats, Report, Rewrite, Skip, Verification
from gconv_rewrite.targets import ConvProps, Decision

Accept = Callable[[ConvProps], tuple[bool, str]]  # a target's rule: (wanted?, why)


class RewritePass(Protocol):
    """One rewrite of one format, as its backend built it (the pass class itself: an onnx-ir pass,
    a GraphDef pass, a Keras pass); the backend's ``apply`` runs it on the model. What it did, and
    what it left and why, are in ``rewrites`` and ``skipped``; with a target, ``decisions`` has one
    record per grouped conv judged (``gconv_rewrite.targets.Decision``)."""

    rewrites: list[Rewrite]
    skipped: list[Skip]
    decisions: list[Decision]


class ModelFormat(Protocol):
    """The model-format role: read, describe and write one format. Every backend has it; TFLite
    has only this one (it is written by ``--to tflite``, never rewritten). Running a model is
    the rewriter role's ``verify`` (``gconv_rewrite.proof``) or a conversion's."""

    name: str  # "onnx", "savedmodel", "keras", "tflite"
    suffix: str  # of a file it writes ("" for a folder)
    # A format checker the driver runs on the written file (its "checker" phase); None: the
    # format has none beyond its own writer.
    check: Callable[[Path], None] | None

    def load(self, path: Path, options) -> Any:
        """The model in memory (None: nothing to rewrite, already reported); may add skips to
        ``self.report`` (a signature not rewritten…)."""

    def files_read(self, path: Path, model: Any) -> list[Path]:
        """Every file the input reads (its external data too): never written over or removed."""

    def stats(self, model: Any) -> ModelStats: ...

    def save(self, model: Any, path: Path) -> None:
        """Write ``model`` to ``path`` (in a staging or scratch folder); raise a RewriteError."""

    def result(self, model: Any) -> Any:
        """What ``Result.model`` holds: the format's own form of the model (a GraphDef for a SavedModel)."""


class Rewriter(ModelFormat, Protocol):
    """The rewriter role: the input formats (ONNX, SavedModel, Keras). Its passes read the graph
    into candidates and plan them with ``gconv_rewrite.plan``; ``emit`` returns the rewritten model,
    ready to save; ``verify`` proves what was written."""

    # Verify even when nothing was rewritten (Keras compares its rebuild with Keras's own load).
    verify_unchanged: bool

    def fuse_passes(self, model: Any, *, rewrite: bool, options, accept: Accept | None = None) -> list[RewritePass]:
        """The fusions, in the order they run."""

    def fold_pass(self, model: Any, fuse_passes: list[RewritePass], options) -> RewritePass | None:
        """What folds into the convs ``fuse_passes`` wrote (None: the fusions carry their tails)."""

    def expand_pass(self, model: Any, *, rewrite: bool, options, accept: Accept | None = None,
                    after: list[RewritePass] = ()) -> RewritePass:
        """The expansion; what the passes ``after`` wrote (a target's fusions) is left alone."""

    def apply(self, rewrite_pass: RewritePass, model: Any) -> Any:
        """Run one of this backend's passes on ``model``; return the model (changed in place or anew)."""

    def emit(self, model: Any, report: Report, options, *, apply: bool = True) -> Any:
        """The rewritten model ready to save (``apply`` False: a find-only run), or ``Unwritable``."""

    def verify(self, source: Path, rewritten: Any, written: Path, options, report: Report) -> Verification:
        """Run the original (read from ``source``) and the written model on the same inputs and
        compare every output; return the table (the driver raises when it did not pass)."""


ROLES: dict[str, type] = {"format": ModelFormat, "rewriter": Rewriter}


class Conversion(Protocol):
    """``--to``: a written model of ``source`` format becomes one of ``target`` format."""

    source: str
    target: str
    # The driver saves and proves the source-format model first (in scratch) and hands its path
    # to ``convert``; False: the conversion is proven against the original on its own.
    proves_source: bool

    def check_output(self, output: Path) -> None: ...

    def convert(self, model: Any, written: Path | None, folder: Path, options, report: Report) -> Any:
        """``model``: the source format's model (the rewritten one, or what the hop before made);
        ``written``: where the driver saved it, if it did; returns the target format's model."""

    def verify(self, previous: Any, converted: Any, path: Path, options, report: Report) -> Verification | None:
        """Run ``converted`` (saved at ``path``) against ``previous`` (the model this hop got),
        the same inputs; return the table, or add rows (``FORMAT:OUTPUT``) to the report's."""


@dataclass
class Unwritable:
    """What ``emit`` returns when the model cannot be rebuilt but nothing changed: ``write`` puts
    the input back as it was (or is None: nothing is written), ``note`` says why."""

    note: str
    write: Callable[[Path], None] | None = None
    skips: list[Skip] = field(default_factory=list)


# format → (module, class, the roles it has): a view of the one format table (gconv_rewrite.formats.FORMATS)
BACKENDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    fmt.name: (*fmt.backend.split(":"), fmt.roles) for fmt in formats.FORMATS}

# --to: (input format, output format) → the hops the driver chains, each "module:Class"; both
# this and the backend lookup read the one format table.
ROUTES: dict[tuple[str, str], list[str]] = {
    (fmt.name, to): list(hops) for fmt in formats.FORMATS for to, hops in fmt.conversions.items()}


_NO_ROUTE = {
    "onnx": "--to {to} needs a SavedModel or Keras input; ONNX stays ONNX",
    "savedmodel": "a SavedModel converts to a SavedModel or ONNX, not {to} (and with --to tflite to TFLite)",
    "keras": "--to {to} is not supported for Keras inputs (.keras, ONNX, SavedModel or TFLite)",
}


def format_backend(fmt: str, report: Report) -> ModelFormat:
    """The backend that reads and writes ``fmt`` (the writer of a ``--to`` output)."""
    module, name = formats.row(fmt).backend.split(":")
    return getattr(importlib.import_module(module), name)(report)


def rewriter_backend(fmt: str, report: Report) -> Rewriter:
    """The backend that rewrites ``fmt`` (an input format: the driver rewrites only those)."""
    if "rewriter" not in formats.row(fmt).roles:
        raise BadInput(f"{fmt} models are written by --to {fmt}, not rewritten")
    return format_backend(fmt, report)


def conversions(fmt: str, to: str | None, where: str) -> list[Conversion]:
    """The hops from ``fmt`` to ``to`` (none when ``to`` is the input's own format)."""
    if to in (None, fmt):
        return []
    routes = formats.row(fmt).conversions  # the table itself, not ROUTES (its view at import)
    if to not in routes:
        reached = ", ".join(routes) or "no other format"
        no_route = _NO_ROUTE.get(fmt, f"--to {{to}} is not supported for {fmt} inputs (they convert to {reached})")
        raise BadInput(f"{where}: " + no_route.format(to=to))
    hops = []
    for spec in routes[to]:
        module, name = spec.split(":")
        hops.append(getattr(importlib.import_module(module), name)())
    return hops
