"""Loading and saving models: format detection, ONNX through onnx-ir, atomic output.

ONNX models load lazily (external tensors stay memory-mapped until a rewrite touches them) and
save keeping everything the rewrite did not touch; onnx-ir carries metadata, doc strings, opset
imports, value_info, functions and names through unchanged.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gconv_rewrite.lazy import lazy_module

# Imported on first use: a Keras or SavedModel run never reads ONNX (about 0.9 s of every CLI run).
onnx = lazy_module("onnx", "onnx.external_data_helper")
ir = lazy_module("onnx_ir")

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks, the pid alone tells a dead run's leftovers
    fcntl = None

from gconv_rewrite.errors import BadInput, OutputError

# The one table of model formats. Detection (``detect_format``), the default output name
# (``default_output``), folder walks (``gconv_rewrite.batch.walk``), the CLI's ``--to`` choices and help,
# the benchmark's runtimes (``gconv_rewrite.benchmark.RUNTIMES``) and the driver's backend and
# conversion lookup (``gconv_rewrite.backend``) all read it: a new format is its package plus one row.
# (When each kept its own list, ``.hdf5`` was read as Keras but walked past, and its default
# output ``m.fused.hdf5`` refused.)


@dataclass(frozen=True)
class Format:
    name: str  # as --to and reports name it
    read_suffixes: tuple[str, ...]  # files read as this format (lower case); () for none
    folder_marker: str | None  # a folder holding this file is one model of this format
    write_suffix: str  # of what it writes ("" for a folder)
    backend: str  # "module:Class" of its gconv_rewrite.backend.Backend
    runtime: str  # the runtime --benchmark times it on, as reported
    runtime_loader: str  # "module:function": (path, threads, options) -> gconv_rewrite.benchmark.Loaded
    # --to FORMAT from an input of this format: the conversion hops the driver chains, each "module:Class".
    conversions: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    # The backend's roles (gconv_rewrite.backend): "format" (load, save, stats...) and "rewriter"
    # (passes, emit, verify); an output-only format has the first.
    roles: tuple[str, ...] = ("format", "rewriter")
    # "module:function" (source, options, apply=) -> a context manager: the original's reference run
    # started before anything else of the run, in a process of its own (Keras); None: none.
    reference_ahead: str | None = None

    @property
    def readable(self) -> bool:
        """Whether the tool takes it as input (TFLite is an output format only)."""
        return bool(self.read_suffixes) or self.folder_marker is not None


_TF_TO_ONNX = "gconv_rewrite.passes.tf.to_onnx:SavedModelToOnnx"
_KERAS_TO_SAVEDMODEL = "gconv_rewrite.passes.keras.to_savedmodel:KerasToSavedModel"

FORMATS: tuple[Format, ...] = (
    Format("onnx", (".onnx",), None, ".onnx", "gconv_rewrite.passes.onnx.backend:OnnxBackend",
           "onnxruntime", "gconv_rewrite.benchmark:_load_onnx"),
    Format("savedmodel", (), "saved_model.pb", "", "gconv_rewrite.passes.tf.backend:SavedModelBackend",
           "tensorflow", "gconv_rewrite.benchmark:_load_savedmodel",
           {"onnx": (_TF_TO_ONNX,), "tflite": ("gconv_rewrite.passes.tflite.from_savedmodel:SavedModelToTFLite",)}),
    # .h5/.hdf5: legacy HDF5 files, read by tf-keras or Keras 3. Keras writes only the Keras 3
    # archive: an HDF5 input's rewrite is NAME.fused.keras, never NAME.fused.h5.
    Format("keras", (".keras", ".h5", ".hdf5"), None, ".keras", "gconv_rewrite.passes.keras.backend:KerasBackend",
           "keras", "gconv_rewrite.benchmark:_load_keras",
           {"onnx": (_KERAS_TO_SAVEDMODEL, _TF_TO_ONNX), "savedmodel": (_KERAS_TO_SAVEDMODEL,),
            "tflite": ("gconv_rewrite.passes.tflite.from_keras:KerasToTFLite",)},
           reference_ahead="gconv_rewrite.passes.keras.reference:reference_ahead"),
    Format("tflite", (), None, ".tflite", "gconv_rewrite.passes.tflite.backend:TFLiteBackend",
           "tflite", "gconv_rewrite.benchmark:_load_tflite", roles=("format",)),
)

# Views of the table as it was at import (tests and callers that want a constant); the functions
# below read ``FORMATS`` itself, so a row added at run time is detected and walked too.
READ_SUFFIXES: dict[str, tuple[str, ...]] = {f.name: f.read_suffixes for f in FORMATS if f.read_suffixes}
WRITE_SUFFIX: dict[str, str] = {f.name: f.write_suffix for f in FORMATS}
ONNX_SUFFIXES = FORMATS[0].read_suffixes
MODEL_SUFFIXES: tuple[str, ...] = tuple(s for f in FORMATS for s in f.read_suffixes)


def row(name: str) -> Format:
    """The table's row for format ``name`` (KeyError for a name in no row)."""
    found = next((f for f in FORMATS if f.name == name), None)
    if found is None:
        raise KeyError(name)
    return found


def model_suffixes() -> tuple[str, ...]:
    """Every file suffix a folder walk picks up: the model files the tool reads."""
    return tuple(s for f in FORMATS for s in f.read_suffixes)


def output_formats() -> list[str]:
    """What ``--to`` offers, in the table's order: every format read (``--to`` its own format
    changes nothing) and every format some input converts to."""
    reached = {to for f in FORMATS for to in f.conversions}
    return [f.name for f in FORMATS if f.readable or f.name in reached]


def folder_format(path: Path) -> str | None:
    """The format of a folder that is one model (a SavedModel: ``saved_model.pb`` inside), or None."""
    return next((f.name for f in FORMATS if f.folder_marker and (path / f.folder_marker).is_file()), None)


def format_of_suffix(suffix: str) -> str | None:
    """The format whose files end in ``suffix`` (any case), or None for a suffix in no row."""
    suffix = suffix.lower()
    return next((f.name for f in FORMATS if suffix in f.read_suffixes), None)


def written_format_of_suffix(suffix: str) -> str | None:
    """The format a file named with ``suffix`` holds, read or written (``.tflite`` too), or None."""
    suffix = suffix.lower()
    return format_of_suffix(suffix) or next((f.name for f in FORMATS if f.write_suffix and f.write_suffix == suffix),
                                            None)


def suffixes_shown() -> str:
    """The model file suffixes, as help and errors list them: '.onnx, .keras, .h5, .hdf5'."""
    return ", ".join(model_suffixes())


def detect_format(path: Path) -> str:
    """'onnx', 'savedmodel' or 'keras', or a BadInput saying why the path is none of them."""
    check_utf8(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file or directory")
    if path.is_dir():
        fmt = folder_format(path)
        if fmt is not None:
            return fmt
        raise BadInput(f"{path}: a directory, but not a SavedModel (no saved_model.pb in it)")
    # A suffix in no row (or none) is tried as ONNX; the loader says clearly if it is not.
    return format_of_suffix(path.suffix) or "onnx"


def shown(path) -> str:
    """``path`` as printed: control characters (a newline in a file name could forge a second
    error line, an escape sequence could repaint the terminal) and undecodable bytes escaped."""
    text = str(path)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else
                   (f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else repr(c)[1:-1])
                   for c in text)


def check_utf8(path: Path, what: str = "") -> None:
    """Refuse a path that is not valid UTF-8: onnx, onnxruntime and TensorFlow open files by a
    UTF-8 name and cannot name it at all (it would fail later as if the model were wrong)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f"{shown(path)}: {what + ' ' if what else ''}path is not valid UTF-8, and onnx, onnxruntime "
                       "and TensorFlow open files only by UTF-8 names; rename it") from None


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
        tensor_problem = _tensor_data_problem(proto, path.parent)
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
    if tensor_problem:
        raise BadInput(f"{path}: not a valid ONNX model ({tensor_problem})")
    return model


# Values of TensorProto's typed fields per element, where they hold a different count than elements.
_TYPED_FIELDS = ("float_data", "double_data", "int32_data", "int64_data", "uint64_data")
_TWO_PER_ELEMENT = {"COMPLEX64", "COMPLEX128"}


def _tensor_data_problem(proto: onnx.ModelProto, folder: Path) -> str | None:
    """The first tensor whose data cannot hold its shape, said in words, or None. A truncated
    ``raw_data`` or external data file otherwise surfaces deep in a rewrite as a numpy error
    ("cannot reshape array of size 574 ..."), naming neither the tensor nor the cause. Reads the
    lengths only (external files: their size), never the data itself."""
    sizes: dict[str, int | None] = {}
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        try:
            dtype = ir.DataType(tensor.data_type)
        except ValueError:
            continue  # an unknown type is the loader's to refuse
        if dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED):
            continue  # strings have no fixed size
        if any(dim < 0 for dim in tensor.dims):
            return f"tensor {tensor.name!r} has a negative dimension: shape {list(tensor.dims)}"
        elements = 1
        for dim in tensor.dims:
            elements *= dim
        needed = -(-elements * dtype.bitwidth // 8)
        what = f"tensor {tensor.name!r} ({dtype.name.lower()}, shape {list(tensor.dims)}) needs {needed} bytes"
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            problem = _external_problem(tensor, needed, what, folder, sizes)
            if problem:
                return problem
        elif tensor.HasField("raw_data") and len(tensor.raw_data) != needed:
            return f"{what}, but its raw_data holds {len(tensor.raw_data)}"
        elif dtype.bitwidth >= 8:  # (4-bit types pack their typed values: left to onnx)
            for field in _TYPED_FIELDS:
                count = len(getattr(tensor, field))
                per_element = 2 if dtype.name in _TWO_PER_ELEMENT else 1
                expected = elements * per_element
                if count and count != expected:
                    return f"{what}, but its {field} holds {count} values where {expected} are needed"
    return None


def _external_problem(tensor, needed: int, what: str, folder: Path, sizes: dict) -> str | None:
    """Whether the bytes an external tensor names exist: ``offset + length`` within the file, and
    ``length`` (when given) at least what the shape needs."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    try:
        offset, length = int(entries.get("offset", 0)), entries.get("length")
        length = int(length) if length is not None else None
    except ValueError:
        return f"tensor {tensor.name!r}: its external data offset or length is not a number"
    if location not in sizes:
        try:
            sizes[location] = os.stat(folder / location).st_size
        except OSError:
            sizes[location] = None  # missing files are reported by name elsewhere
    size = sizes[location]
    if length is not None and length < needed:
        return f"{what}, but its external data length is {length}"
    end = offset + (length if length is not None else needed)
    if size is not None and end > size:
        return f"{what} at bytes {offset}..{end} of {location}, but that file holds {size} bytes (truncated?)"
    return None


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
    except ir.serde.SerdeError as exc:  # what the file held cannot be written back (a damaged attribute)
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise BadInput(f"the model cannot be written (as {shown(path.name)}): part of the input is malformed "
                       f"({type(cause).__name__}: {str(cause).strip().splitlines()[0][:200]})") from exc
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
    """NAME.fused.onnx, NAME.expanded.keras, NAME.fused/ (SavedModel), NAME.fused.onnx (--to onnx),
    NAME.tflite (--to tflite: a conversion, fused unless said otherwise; NAME.expanded.tflite)."""
    suffix = ".fused" if mode == "fuse" else ".expanded"
    if to == "tflite":
        stem = path.name if path.is_dir() else path.stem
        return path.with_name(stem + ("" if mode == "fuse" else suffix) + row("tflite").write_suffix)
    if path.is_dir():
        return path.with_name(path.name + suffix + row(to or folder_format(path) or "savedmodel").write_suffix)
    if to is not None:
        extension = row(to).write_suffix
    else:  # the input's own format: a Keras file of any suffix is written as .keras
        fmt = format_of_suffix(path.suffix)
        extension = row(fmt).write_suffix if fmt is not None else path.suffix
    return path.with_name(path.stem + suffix + extension)


_SHOWN_NAMES = {"onnx": "ONNX", "savedmodel": "SavedModel", "keras": "Keras", "tflite": "TFLite"}


def check_output_suffix(output: Path, input_format: str, to: str | None) -> None:
    """Refuse an output named like another format than the one written (an ONNX model under
    ``out.keras`` would be ONNX bytes a Keras loader chokes on), with the flag that writes that
    format where ``--to`` has it, else the suffix this format is written with. A suffix of no
    format (``out.bin``) is the user's choice and stays allowed."""
    written = to or input_format
    named = written_format_of_suffix(output.suffix)
    if named is None or named == written:
        return
    if to not in (None, input_format) and not row(written).write_suffix:
        return  # a conversion to a folder: its own check_output names the folder it writes
    what, wanted = _SHOWN_NAMES.get(written, written), _SHOWN_NAMES.get(named, named)
    own = row(written).write_suffix
    keep = f"name it NAME{own}" if own else "name the folder without a model file suffix"
    article = "an" if wanted[0] in "AEIOU" else "a"
    start = f"{shown(output)}: named like {article} {wanted} file ({output.suffix}), but this run writes {what}"
    if named in row(input_format).conversions or named == input_format:
        raise BadInput(f"{start}: use --to {named} to write {wanted}, or {keep}")
    raise BadInput(f"{start} (a{'n' if input_format == 'onnx' else ''} {_SHOWN_NAMES.get(input_format, input_format)} "
                   f"input is not converted to {wanted}); {keep}")


def input_files(path: Path, model: ir.Model | None = None, *, deep: bool = True) -> list[Path]:
    """Every file (and folder) reading ``path`` depends on: an ONNX file and its external data
    (from ``model`` when it is already loaded), a SavedModel folder and everything in it, a Keras
    file. Missing files are left out: they cannot be written over."""
    files = [path]
    if path.is_dir():
        for root, dirs, names in os.walk(path):
            files.extend(Path(root) / n for n in dirs + names)
    elif deep and path.is_file() and detect_format(path) == "onnx":
        if model is not None:
            locations = _external_files(model)
        else:
            try:
                proto = onnx.load(str(path), load_external_data=False)
            except Exception:  # not ONNX at all: the loader will say so
                return files
            locations = {entry.value for tensor in onnx.external_data_helper._get_all_tensors(proto)
                         if tensor.data_location == onnx.TensorProto.EXTERNAL
                         for entry in tensor.external_data if entry.key == "location"}
        files.extend(path.parent / location for location in sorted(locations))
    return [f for f in files if f.exists()]


def same_file(a: Path, b: Path) -> bool:
    """The same file on disk: symlinks followed, hard links and case-insensitive names included
    (``samefile`` compares st_dev and st_ino)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_not_read(written: Path, read: list[Path], what: str = "-o") -> None:
    """Refuse to write ``written`` (a file to replace, or a folder to replace or write into) when
    anything the input reads is that file, inside that folder, or the folder it would go in; or
    when it is no regular file or folder (a device, a FIFO, a socket: ``check_target_kind``)."""
    check_name_length(written, what)
    follow_output_link(written, what)  # a link to a stream (/dev/stdout): refused before anything runs
    check_target_kind(written, what)
    if written.exists() or written.is_symlink():
        for item in read:
            if same_file(written, item):
                raise OutputError(f"{written}: the input reads this file ({item}); choose another {what}")
        if written.is_dir():
            for item in read:
                if any(same_file(written, parent) for parent in item.parents):
                    raise OutputError(f"{written}: the input reads {item} inside this folder, which the output "
                                      f"would replace; choose another {what}")
    existing_parents = [p for p in written.absolute().parents if p.exists()]
    for item in read:
        if item.is_dir() and any(same_file(item, parent) for parent in existing_parents[:8]):
            raise OutputError(f"{written}: inside the input {item}, which the input reads; choose another {what}")


def check_output_path(output: Path, inputs: list[Path], force: bool, *, deep: bool = True) -> None:
    """Refuse an output that would write over the input or anything it reads (its external data,
    its SavedModel folder, ...), exists without ``force``, or cannot be written. ``deep=False``
    leaves out an ONNX file's external data (checked once the model is loaded)."""
    check_utf8(output, "output")
    check_name_length(output)
    read = [f for p in inputs for f in input_files(p, deep=deep)]
    resolved = output.resolve()
    if any(resolved == p.resolve() for p in inputs):
        raise OutputError(f"{output}: refusing to overwrite the input; choose another -o")
    check_not_read(output, read)
    if output.exists() and not force:
        raise OutputError(f"{output}: already exists (use --force to overwrite)")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{output}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{output}: folder {folder} is not writable")


# -- committing outputs ---------------------------------------------------------------------------
#
# A run stages everything in ``.OUT.gconv-<pid>-<random>.tmp`` beside the output (one filesystem,
# so the final renames are atomic) and scratch work in ``$TMPDIR/gconv-<pid>-<random>``; it holds
# a shared flock on each while it lives. A later run removes such folders when their owner is gone
# (no process with that pid, and nobody holding the flock), so a kill -9 leaves nothing for good.
#
# ONNX external data is named after its content (``OUT.<sha256[:16]>.data``): a file of that name
# always holds those bytes, so writing it never changes what an existing model reads. Under an
# exclusive flock on ``.OUT.gconv.lock`` the data is renamed into place, then the model, and only
# then the data the previous model read is removed: at every instant the model on disk reads
# complete data of its own. Concurrent runs on the same output commit one after the other.

_TOKEN = re.compile(r"(\d+)-[0-9a-f]+")

# Most filesystems allow 255 bytes per name. A helper's name (staging, lock, set-aside copy,
# external data) adds to the output's name; where that would not fit, the output's name is
# replaced in it by a hash of the name, so a legal output name never fails on a helper's.
NAME_MAX = 255
_HELPER_EXTRA = len(".") + len(".gconv-") + 7 + len("-") + 8 + len(".tmp")  # a pid has at most 7 digits
_DATA_EXTRA = len(".") + 16 + len(".data")


def _stem(name: str, extra: int) -> str:
    encoded = os.fsencode(name)
    if len(encoded) + extra <= NAME_MAX:
        return name
    return "gconv-" + hashlib.sha256(encoded).hexdigest()[:32]


def helper_stem(output: Path) -> str:
    """What stands for ``output`` in the names of its staging folder, lock and set-aside copy:
    its own name, or a hash of it where the helper's name would be too long."""
    return _stem(output.name, _HELPER_EXTRA)


def data_stem(output_name: str) -> str:
    """What stands for the model's name in its external data file names (``STEM.data`` while
    staged, ``STEM.<sha256[:16]>.data`` committed): the name, or its hash where too long."""
    return _stem(output_name, _DATA_EXTRA)


# Folders whose entries stand for a process's open files: /dev/stdout leads here (/proc/self/fd/1).
_STREAM_FOLDERS = ("/proc/", "/dev/fd")
_MAX_LINKS = 40


def follow_output_link(path: Path, what: str = "-o") -> Path:
    """Where writing ``path`` lands. A symlink is written through, never replaced: the result is
    its final target (created if it does not exist yet), so the commit replaces the target and
    keeps the link, as ``>`` in a shell does. A link into /proc or /dev/fd (``-o /dev/stdout``)
    is refused: outputs are files committed by a rename, and a rename cannot reach a stream."""
    hop = Path(os.path.abspath(path))
    for _ in range(_MAX_LINKS):
        folder = os.path.realpath(hop.parent)
        if any((folder + "/").startswith(prefix if prefix.endswith("/") else prefix + "/")
               for prefix in _STREAM_FOLDERS):
            instead = "; --report - writes the report to stdout" if what == "--report" else ""
            raise OutputError(f"{shown(path)}: leads to a stream of a process ({shown(hop)}); outputs are files "
                              f"written whole and renamed into place, never streams; choose a file for {what}"
                              + instead)
        if not hop.is_symlink():
            return path if hop == Path(os.path.abspath(path)) else hop
        hop = Path(folder) / os.readlink(hop)
    raise OutputError(f"{shown(path)}: too many levels of symbolic links; choose another {what}")


_KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO (named pipe)",
          stat.S_IFSOCK: "a socket"}


def check_target_kind(path: Path, what: str = "-o") -> None:
    """Refuse a target that exists and is neither a regular file nor a folder (a SavedModel), with
    --force or without: the commit renames over it, which would replace a device node such as
    /dev/null, a FIFO or a socket with a regular file. A symlink is judged by what it points to."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return  # nothing there, or a dangling symlink (written through: its target is created)
    except OSError as exc:
        raise OutputError(f"{path}: cannot be examined ({exc.strerror or exc}); choose another {what}") from exc
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
    via = "a symlink to " if path.is_symlink() else ""
    raise OutputError(f"{path}: is {via}{kind}, not a regular file; it is never replaced, with --force or "
                      f"without; choose another {what}")


def check_name_length(path: Path, what: str = "-o") -> None:
    """A name longer than the filesystem allows, said in words before anything runs."""
    length = len(os.fsencode(path.name))
    if length > NAME_MAX:
        raise OutputError(f"{path}: the file name is {length} bytes, longer than the {NAME_MAX} a file system "
                          f"allows; choose a shorter {what}")


def _token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (its leftovers are not to be swept). POSIX: signal 0,
    which sends nothing; on Linux a zombie (exited, not yet reaped) counts as gone. Windows asks
    the process's exit code instead: there ``os.kill(pid, 0)`` *sends* CTRL_C_EVENT to the console
    group. A pid that cannot be asked about counts as alive: sweeping a live run's files is worse
    than leaving a dead run's for later."""
    if isinstance(pid, bool) or pid <= 0:
        return False
    if sys.platform == "win32":
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or a pid this system cannot name): assume alive
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Linux: the process has exited and waits to be reaped (state Z, or X: dead). Elsewhere, or
    when /proc cannot be read, False."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat_line = handle.read()
    except OSError:
        return False
    # "PID (COMMAND) STATE ...": the command may hold spaces and parentheses; the state follows the last ")".
    fields = stat_line[stat_line.rfind(b")") + 1:].split()
    return bool(fields) and fields[0] in (b"Z", b"X")


_PROCESS_QUERY_LIMITED_INFORMATION, _STILL_ACTIVE, _ERROR_ACCESS_DENIED = 0x1000, 259, 5


def _kernel32():
    return ctypes.WinDLL("kernel32", use_last_error=True)


def _last_error() -> int:
    return ctypes.get_last_error()


def _windows_pid_alive(pid: int) -> bool:
    """Windows: open the process for a query and ask whether it has an exit code yet."""
    kernel32 = _kernel32()
    handle = kernel32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        return _last_error() == _ERROR_ACCESS_DENIED  # exists, but not ours to open; else: no such process
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == _STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _hold(folder: Path) -> int | None:
    """A shared flock on ``folder`` for as long as the returned descriptor stays open: the sign
    that its owner lives, even where the pid is not visible (another pid namespace)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        pass
    return fd


def _release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _owner_gone(path: Path, pid: int) -> bool:
    if pid == os.getpid() or _pid_alive(pid):
        return False
    if fcntl is None:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False  # someone holds it: alive after all
    except OSError:
        return True  # no flock here (some network filesystems): the pid is all we know
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep_staging(output: Path) -> list[Path]:
    """Remove what dead runs left beside ``output``: their staging folders, and the old copy of a
    folder output they had set aside (put back if the output is missing). Returns what went."""
    folder = output.parent if str(output.parent) else Path(".")
    pattern = re.compile(rf"\.{re.escape(helper_stem(output))}\.gconv-{_TOKEN.pattern}\.(tmp|old)")
    swept = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return swept
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if not match or not _owner_gone(Path(entry.path), int(match.group(1))):
            continue
        path = Path(entry.path)
        if match.group(2) == "old" and not (output.exists() or output.is_symlink()):
            try:
                os.replace(path, output)  # died between setting the old output aside and the new in
                continue
            except OSError:
                pass
        _remove(path)
        swept.append(path)
    lock_path = folder / f".{helper_stem(output)}.gconv.lock"
    if _drop_stale_lock(lock_path):
        swept.append(lock_path)
    return swept


def _drop_stale_lock(lock_path: Path) -> bool:
    """Unlink a lock file a killed run left, the way a holder does: only while holding it."""
    if fcntl is None or not lock_path.exists():
        return False
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held, current = os.fstat(fd), os.stat(lock_path)
        if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
            os.unlink(lock_path)
            return True
    except OSError:  # held by a live run, or gone meanwhile
        pass
    finally:
        os.close(fd)
    return False


def sweep_scratch(root: Path | None = None) -> list[Path]:
    """Remove ``gconv-<pid>-<random>`` scratch folders in $TMPDIR whose owner is gone."""
    root = Path(root or tempfile.gettempdir())
    pattern = re.compile(rf"gconv-{_TOKEN.pattern}")
    swept = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return swept
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir(follow_symlinks=False) and _owner_gone(Path(entry.path), int(match.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
            swept.append(Path(entry.path))
    return swept


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A private scratch folder ``$TMPDIR/gconv-<pid>-<random>``, removed afterwards (and by a
    later run if this one is killed)."""
    sweep_scratch()
    path = Path(tempfile.gettempdir()) / f"gconv-{_token()}"
    try:
        path.mkdir(mode=0o700)
    except OSError as exc:
        raise OutputError(f"cannot make a scratch folder in {path.parent} ({exc.strerror or exc}); "
                          "set TMPDIR to a writable folder") from exc
    held = _hold(path)
    try:
        yield path
    finally:
        _release(held)
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``.OUT.gconv.lock`` beside ``output``. The holder unlinks the
    lock file before releasing it; a waiter that then gets a lock on an unlinked file retries, so
    no lock file stays behind and two holders never overlap."""
    if fcntl is None:
        yield
        return
    folder = output.parent if str(output.parent) else Path(".")
    lock_path = folder / f".{helper_stem(output)}.gconv.lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                current = os.stat(lock_path)
            except FileNotFoundError:
                current = None
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(lock_path)
        except OSError:
            pass
        os.close(fd)


def _data_name(output_name: str, digest: str) -> str:
    return f"{data_stem(output_name)}.{digest[:16]}.data"


def name_external_data_by_content(model_path: Path, data_name: str) -> str:
    """Rename ``data_name`` (beside ``model_path``) to ``MODEL.<sha256[:16]>.data`` and point the
    model at it; returns the new name."""
    data_path = model_path.parent / data_name
    digest = hashlib.sha256()
    with open(data_path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    new_name = _data_name(model_path.name, digest.hexdigest())
    proto = onnx.load(str(model_path), load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == data_name:
                entry.value = new_name
    os.replace(data_path, model_path.parent / new_name)
    model_path.write_bytes(proto.SerializeToString())
    return new_name


def _own_data_files(output: Path) -> tuple[set[str], set[str]]:
    """(data files the current ``output`` reads that are named after it, every ``OUT.<hash>.data``
    in its folder): what a new commit supersedes."""
    folder = output.parent if str(output.parent) else Path(".")
    referenced: set[str] = set()
    # A Keras file, a report or a TFLite file reads no external data; anything else may be ONNX.
    reads_no_data = written_format_of_suffix(output.suffix) not in (None, "onnx") or output.suffix.lower() == ".json"
    if output.is_file() and not reads_no_data:
        try:
            proto = onnx.load(str(output), load_external_data=False)
            referenced = {entry.value for tensor in onnx.external_data_helper._get_all_tensors(proto)
                          for entry in tensor.external_data if entry.key == "location"}
        except Exception:  # not an ONNX file (a .keras, a report): it reads no data
            referenced = set()
    prefix = data_stem(output.name) + "."
    referenced = {name for name in referenced if name.startswith(prefix) and name.endswith(".data")
                  and "/" not in name and "\\" not in name}
    hashed = re.compile(rf"{re.escape(data_stem(output.name))}\.[0-9a-f]{{16}}\.data")
    try:
        ours = {e.name for e in os.scandir(folder) if hashed.fullmatch(e.name)}
    except OSError:
        ours = set()
    return referenced, ours


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux renameat2 with ``flags``; False where the system or filesystem does not have it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(error, os.strerror(error), str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def _put_new(main: Path, output: Path) -> None:
    """Move ``main`` to ``output`` only if nothing is there, in one step: another run (another
    input, the same -o) may have committed since this one checked. FileExistsError if so."""
    if _renameat2(main, output, _RENAME_NOREPLACE):
        return
    if not main.is_dir():
        try:
            os.link(main, output)  # fails with EEXIST as one step, on every POSIX filesystem with links
        except FileExistsError:
            raise
        except OSError:  # no hard links here (some FUSE and network filesystems): check, then rename
            if output.exists() or output.is_symlink():
                raise FileExistsError(errno.EEXIST, "File exists", str(output)) from None
            os.rename(main, output)
            return
        os.unlink(main)
        return
    if output.exists() or output.is_symlink():  # a folder without renameat2: a rename fails on a full one
        raise FileExistsError(errno.EEXIST, "File exists", str(output))
    os.rename(main, output)


def _put_in_place(main: Path, output: Path, staging: Path, token: str, replace: bool = True) -> None:
    """Move ``main`` to ``output``, replacing whatever is there (a folder too) in one step where
    the system can swap two paths; else the old one is set aside first, under a name the next
    run recognises and puts back if this one dies before the new one is in. Without
    ``replace``, an ``output`` that exists by now is left as it is (FileExistsError)."""
    if not replace:
        _put_new(main, output)
        return
    if not (output.is_dir() and not output.is_symlink()) and not main.is_dir():
        os.replace(main, output)
        return
    if not (output.exists() or output.is_symlink()):
        os.replace(main, output)
        return
    if _exchange(main, output):
        _remove(main)  # now the old output, inside staging
        return
    aside = output.parent / f".{helper_stem(output)}.gconv-{token}.old"
    os.replace(output, aside)
    try:
        os.replace(main, output)
    except BaseException:
        os.replace(aside, output)
        raise
    _remove(aside)


@contextmanager
def atomic_output(output: Path, *, protected: list[Path] = (), replace: bool = True) -> Iterator[Path]:
    """Yield a staging folder beside ``output``; the caller writes ``STAGING/<output's name>``
    (and companions). On success what was written moves into place (companions, then the main
    file or folder, then the superseded data), on any failure or interrupt it is all removed. A
    reader sees the old output or the new one, each complete.

    A symlink given as ``output`` is written through: its target is replaced, atomically, and the
    link kept (``follow_output_link``); a link to a stream (/dev/stdout) is refused.
    ``protected``: files the input reads, never removed even when the old output read them.
    ``replace=False`` (no --force): the commit itself refuses an output that exists by then."""
    with _commit(follow_output_link(output), output.name, protected, replace) as staging:
        yield staging


@contextmanager
def _commit(output: Path, staged_name: str, protected: list[Path], replace: bool) -> Iterator[Path]:
    """``atomic_output`` once links are followed: ``output`` is the path replaced, and the caller
    stages its file as ``staged_name`` (the name it was given, a link's own name)."""
    folder = output.parent if str(output.parent) else Path(".")
    sweep_staging(output)
    token = _token()
    staging = folder / f".{helper_stem(output)}.gconv-{token}.tmp"
    try:
        staging.mkdir(mode=0o700)
    except OSError as exc:
        raise OutputError(f"{output}: cannot write in {folder} ({exc.strerror or exc})") from exc
    held = _hold(staging)
    moved: list[Path] = []
    try:
        yield staging
        main = staging / staged_name
        if not (main.exists() or main.is_symlink()):
            raise OutputError(f"{output}: nothing was staged to write")
        companions = sorted(p for p in staging.iterdir() if p != main)
        if (output.exists() or output.is_symlink()) and output.is_dir() != main.is_dir():
            kinds = ("a folder", "a file") if output.is_dir() else ("a file", "a folder")
            raise OutputError(f"{output}: is {kinds[0]} and the output is {kinds[1]}; remove it or choose another -o")
        with output_lock(output):
            check_target_kind(output, "path")  # again, at the commit: a device node may have appeared since
            superseded, ours = _own_data_files(output)
            # Companions (content-named external data) first, so the model never reads missing
            # data; a name that exists already holds these very bytes, and must stay on rollback.
            for item in companions:
                target = folder / item.name
                existed = target.exists()
                if existed and any(same_file(target, p) for p in protected):
                    continue  # the input reads these very bytes under this name: leave its file be
                os.replace(item, target)
                if not existed:
                    moved.append(target)
            try:
                _put_in_place(main, output, staging, token, replace)
            except FileExistsError:
                raise OutputError(f"{output}: already exists (written by another run since this one began; use "
                                  "--force to overwrite); nothing was written") from None
            moved.clear()
            keep = {p.name for p in companions}
            for name in (superseded | ours) - keep:
                path = folder / name
                if not any(same_file(path, p) for p in protected):
                    try:
                        path.unlink(missing_ok=True)
                    except OSError:  # the new pair is in; an unremovable old file is swept next time
                        pass
    except OSError as exc:
        raise OutputError(f"{output}: write failed ({exc.strerror or exc}); nothing was written") from exc
    finally:
        for item in moved:  # the main file did not land: its companions must not stay either
            item.unlink(missing_ok=True)
        _release(held)
        shutil.rmtree(staging, ignore_errors=True)
