"""TFLite as a backend of the driver (``rewriter.backend``): the fourth format, written by the
``--to tflite`` conversions (``from_savedmodel``, ``from_keras``) and run in the interpreter.

    .tflite flatbuffer ─ ops read back (describe) ─ LiteRT interpreter (XNNPACK, as deployed)

TFLite files are an output: nothing here rewrites one (onnx2tf and TF's converter make them;
this tool fuses before converting), so the pass hooks refuse in one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from passes.tflite.convert import TFLiteModel, describe, input_specs, interpreter, run, signature_runner
from rewriter.errors import BadInput
from rewriter.report import ModelStats, Report
from rewriter.verify import InputSpec


class TFLiteBackend:
    name = "tflite"
    suffix = ".tflite"
    verify_unchanged = False

    def __init__(self, report: Report):
        self.report = report

    def load(self, path: Path, options) -> TFLiteModel:
        content = Path(path).read_bytes()
        signatures = list(interpreter(content).get_signature_list())
        return TFLiteModel(content, signatures[0] if signatures else "serving_default")

    def files_read(self, path: Path, model) -> list[Path]:
        return [path]

    def stats(self, model: TFLiteModel) -> ModelStats:
        return describe(model.content)[0]

    def input_specs(self, model: TFLiteModel) -> list[InputSpec]:
        return input_specs(signature_runner(interpreter(model.content), model.signature))

    def run(self, model_or_path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        model = model_or_path if isinstance(model_or_path, TFLiteModel) else self.load(Path(model_or_path), None)
        return run(model.content, feeds, model.signature)

    def save(self, model: TFLiteModel, path: Path) -> None:
        path.write_bytes(model.content)

    def _output_only(self, *args, **kwargs):
        raise BadInput("TFLite files are written by --to tflite, not rewritten: fuse the SavedModel or Keras "
                       "model they come from")

    fuse_pass = fold_pass = expand_pass = emit = verify = _output_only
