"""Loading and saving models: format detection, ONNX through onnx-ir, atomic output.

ONNX models load lazily (external tensors stay memory-mapped until a rewrite touches them) and
save keeping everything the rewrite did not touch; onnx-ir carries metadata, doc strings, opset
imports, value_info, functions and names through unchanged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import onnx
import onnx_ir as ir

from rewriter.errors import BadInput, OutputError

ONNX_SUFFIXES = (".onnx",)


def detect_format(path: Path) -> str:
    """'onnx', 'savedmodel' or 'keras', or a BadInput saying why the path is none of them."""
    if not path.exists():
        raise BadInput(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "savedmodel"
        raise BadInput(f"{path}: a directory, but not a SavedModel (no saved_model.pb in it)")
    suffix = path.suffix.lower()
    if suffix in (".keras", ".h5", ".hdf5"):
        return "keras"
    if suffix in ONNX_SUFFIXES or suffix == "":
        return "onnx"
    return "onnx"  # anything else is tried as ONNX; the loader says clearly if it is not


def _external_files(model: ir.Model) -> set[str]:
    files = set()
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                files.add(tensor.location)
    return files


def load_onnx(path: Path) -> ir.Model:
    """Load an ONNX file lazily, turning every way it can be broken into a one-line BadInput."""
    if not path.is_file():
        raise BadInput(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise BadInput(f"{path}: empty file")
    try:
        proto = onnx.load(str(path), load_external_data=False)  # external tensors: memory-mapped by onnx-ir
        model = ir.serde.deserialize_model(proto)
        ir.external_data.set_base_dir(model.graph, str(path.parent))
        model.meta[_VALUE_INFO_NAMES] = _value_info_names(proto.graph)
        del proto
    except Exception as exc:  # protobuf and onnx raise many kinds; all mean "not a readable ONNX file"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"{path}: not a valid ONNX model ({detail[:200]})") from exc
    if not model.opset_imports or model.graph is None:
        raise BadInput(f"{path}: not a valid ONNX model (no opset imports: truncated or not ONNX)")
    if model.ir_version is None or model.ir_version < 3 or model.ir_version > 100:
        raise BadInput(f"{path}: not a valid ONNX model (ir_version {model.ir_version})")
    default_opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    newest = onnx.defs.onnx_opset_version()
    if default_opset is not None and not 1 <= default_opset <= newest:
        raise BadInput(f"{path}: opset {default_opset} is not supported (this onnx knows opsets 1..{newest})")
    problem = _structural_problem(model)
    if problem:
        raise BadInput(f"{path}: not a valid ONNX model ({problem})")
    for location in sorted(_external_files(model)):
        data = path.parent / location
        if not data.is_file():
            raise BadInput(f"{path}: its external data file {location} is missing (looked in {path.parent})")
    return model


def _value_info_names(graph: onnx.GraphProto) -> frozenset[str]:
    names = {info.name for info in graph.value_info}
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names |= _value_info_names(sub)
    return frozenset(names)


_VALUE_INFO_NAMES = "gconv_rewrite.value_info_names"


def _structural_problem(model: ir.Model) -> str | None:
    """What makes the graph unusable, or None: onnx-ir loads dangling references with only a
    warning, and a corrupt file often decodes into exactly that."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or tensor.dtype == ir.DataType.UNDEFINED:
                return f"initializer {value.name!r} has no data type"
        for node in graph:
            for value in node.inputs:
                if value is not None and value.producer() is None and not value.is_graph_input() \
                        and not value.is_initializer():
                    return f"node {node.name or node.op_type!r} reads {value.name!r}, which nothing produces"
    return None


def save_onnx(model: ir.Model, path: Path, *, external_data: str | None = None, threshold: int = 1024) -> None:
    """Save; with ``external_data`` the weights go to that file beside ``path``.

    Always pass a *new* external data name: writing over the file that lazily-loaded tensors
    still read from would corrupt them.
    """
    # onnx-ir writes a value_info entry for every initializer; keep the file's own list instead,
    # so a model the rewrite did not touch saves as it was.
    recorded = model.meta.get(_VALUE_INFO_NAMES)
    hidden = []
    if recorded is not None:
        for graph in model.graphs():
            inputs = {v.name for v in graph.inputs}
            for value in graph.initializers.values():
                if value.name not in recorded and value.name not in inputs and value.type is not None:
                    hidden.append((value, value.type, value.shape))
                    value.type, value.shape = None, None
    try:
        if external_data is None:
            ir.save(model, path)
        else:
            ir.save(model, path, external_data=external_data, size_threshold_bytes=threshold)
    finally:
        for value, type_, shape in hidden:
            value.type, value.shape = type_, shape


def external_layout(model: ir.Model) -> int | None:
    """The size threshold that keeps external what was external, or None if nothing was."""
    sizes = [value.const_value.nbytes for graph in model.graphs() for value in graph.initializers.values()
             if isinstance(value.const_value, ir.ExternalTensor)]
    # Tiny tensors stay inline whatever the input did: onnxruntime reads shape-like constants
    # (Split sizes, Slice bounds) at session creation and refuses them external.
    return max(min(sizes), 1024) if sizes else None


def default_output(path: Path, mode: str, to: str | None = None) -> Path:
    """NAME.fused.onnx, NAME.expanded.keras, NAME.fused/ (SavedModel), NAME.fused.onnx (--to onnx)."""
    suffix = ".fused" if mode == "fuse" else ".expanded"
    extension = {"onnx": ".onnx", "savedmodel": "", "keras": ".keras"}.get(to or "")
    if path.is_dir():
        return path.with_name(path.name + suffix + (extension or ""))
    if extension is None:
        extension = path.suffix if path.suffix.lower() != ".h5" else ".keras"
    return path.with_name(path.stem + suffix + extension)


def check_output_path(output: Path, inputs: list[Path], force: bool) -> None:
    resolved = output.resolve()
    if any(resolved == p.resolve() for p in inputs):
        raise OutputError(f"{output}: refusing to overwrite the input; choose another -o")
    if output.exists() and not force:
        raise OutputError(f"{output}: already exists (use --force to overwrite)")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{output}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{output}: folder {folder} is not writable")


@contextmanager
def atomic_output(output: Path) -> Iterator[Path]:
    """Yield a staging folder beside ``output``; on success move what was written there into
    place (the main file last), on any failure or interrupt remove it all. A reader sees the
    output complete or not at all."""
    folder = output.parent if str(output.parent) else Path(".")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise OutputError(f"{output}: cannot write in {folder} ({exc.strerror or exc})") from exc
    moved: list[Path] = []
    try:
        yield staging
        main = staging / output.name
        if not main.exists():
            raise OutputError(f"{output}: nothing was staged to write")
        # Companions (external data) first, so the main file never points at missing data.
        for item in sorted(p for p in staging.iterdir() if p != main):
            os.replace(item, folder / item.name)
            moved.append(folder / item.name)
        if main.is_dir() and output.exists():
            shutil.rmtree(output)
        os.replace(main, output)
        moved.clear()
    except OSError as exc:
        raise OutputError(f"{output}: write failed ({exc.strerror or exc}); nothing was written") from exc
    finally:
        for item in moved:  # the main file did not land: its companions must not stay either
            item.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
