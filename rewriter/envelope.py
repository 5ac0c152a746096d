"""The one JSON document of a run (``--format json`` on stdout, ``--report`` in a file), success or
error, described in docs/JSON.md. Bump ``SCHEMA_VERSION`` when a key is removed or changes meaning
(adding a key does not)."""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from typing import Any

from gconv_rewrite import __version__, errors

SCHEMA_VERSION = 1
TOOL = "gconv-rewrite"

# A model's `status` (docs/JSON.md): what became of it.
STATUSES = ("rewritten", "unchanged", "would-rewrite", "clean", "dry-run", "verification-failed", "error")
# `error.kind`: which kind of failure, from the exception the run raised.
ERROR_KINDS = {errors.VerificationFailed: "verification-failed",
               errors.VerificationImpossible: "verification-impossible",
               errors.OutputError: "output", errors.BadInput: "bad-input"}
USAGE, INTERNAL, WORKER_DIED = "usage", "internal", "worker-died"


def error_kind(error: BaseException) -> str:
    """The `error.kind` of an exception: the first of ``ERROR_KINDS`` it is an instance of."""
    for cls, kind in ERROR_KINDS.items():
        if isinstance(error, cls):
            return kind
    return "bad-input" if isinstance(error, errors.RewriteError) else INTERNAL


def _version(package: str) -> str | None:
    try:
        return installed_version(package)
    except PackageNotFoundError:
        return None


def environment(tensorflow: bool = False) -> dict[str, Any]:
    """What the run ran on: Python, the ONNX stack, and TensorFlow / Keras where a model needed
    them (``tensorflow``) or this process loaded them."""
    env = {"python": platform.python_version(), "onnx": _version("onnx"), "onnx_ir": _version("onnx-ir"),
           "onnxruntime": _version("onnxruntime"), "platform": platform.platform()}
    if tensorflow or "tensorflow" in sys.modules:
        env["tensorflow"] = _version("tensorflow")
        env["keras"] = _version("keras")
        if _version("tf-keras") is not None:
            env["tf_keras"] = _version("tf-keras")
    return env


def model_record(result) -> dict[str, Any]:
    """One model (a ``batch.JobResult``): ``path``, ``status``, ``exit_code``, ``output``,
    ``seconds``, ``report`` (the API's report, null on error) and ``error`` (null, or
    ``{kind, message}``)."""
    record = {"path": result.input, **result.to_dict()}
    if result.error is not None:
        record["error"] = {"kind": result.error_kind or "bad-input", "message": result.error}
    return record


def _uses_tensorflow(results) -> bool:
    return any(not str(r.input).lower().endswith(".onnx") for r in results)


def document(results, exit_code: int, *, error: dict[str, str] | None = None) -> dict[str, Any]:
    """The run's envelope; ``error``: ``{kind, message}`` of a failure of the run itself (before any
    model ran, or a --report/--html that could not be written after the models were)."""
    doc = {"schema_version": SCHEMA_VERSION, "tool": TOOL, "version": __version__,
           "environment": environment(_uses_tensorflow(results)), "exit_code": exit_code,
           "models": [model_record(r) for r in results]}
    if error is not None:
        doc["error"] = error
    return doc


def targets_document(rows: list[dict[str, str]]) -> dict[str, Any]:
    """--list-targets --format json."""
    return {"schema_version": SCHEMA_VERSION, "tool": TOOL, "version": __version__, "exit_code": 0,
            "targets": rows}
