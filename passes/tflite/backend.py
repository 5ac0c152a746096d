"""TFLite as a backend of the driver (``gconv_rewrite.backend``): the fourth format, written by the
``--to tflite`` conversions (``from_savedmodel``, ``from_keras``) and run in the interpreter.

    .tflite flatbuffer ─ ops read back (describe) ─ LiteRT interpreter (XNNPACK, as deployed)

TFLite files are an output: nothing here rewrites one (onnx2tf and TF's converter make them;
this tool fuses before converting), so this backend has the model-format role only.
"""

from __future__ import annotations

from pathlib import Path

from gconv_rewrite.passes.tflite.convert import TFLiteModel, describe, interpreter
from gconv_rewrite.report import ModelStats, Report


class TFLiteBackend:
    name = "tflite"
    suffix = ".tflite"
    check = None  # the conversion's own interpreter run reads the file back

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

    def save(self, model: TFLiteModel, path: Path) -> None:
        path.write_bytes(model.content)

    def result(self, model: TFLiteModel) -> TFLiteModel:
        return model
