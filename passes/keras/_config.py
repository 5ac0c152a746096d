"""Read a Keras file without running any of it: the model config as a graph of layer calls,
and the weights as numpy arrays per layer.

    .keras (Keras 3): a zip of config.json + model.weights.h5 (layers/NAME/vars/I)
    .h5 (Keras 2 / tf-keras): attribute model_config (JSON) + group model_weights/NAME/...

Nothing here imports TensorFlow or Keras, unmarshals code or calls ``from_config``: the graph
is read as JSON, so a file whose Lambdas must not run can still be inspected and refused.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gconv_rewrite.errors import BadInput, one_line

FUNCTIONAL = ("Functional", "Model")
SEQUENTIAL = ("Sequential",)


@dataclass(frozen=True)
class TensorRef:
    """Output ``tensor`` (index into the flattened outputs) of call ``node`` of ``layer``."""

    layer: str
    node: int
    tensor: int


@dataclass
class Call:
    """One call of a layer (a Keras "node"): the raw node data and the tensors it reads."""

    layer: LayerSpec
    index: int
    data: Any  # the file's node data (Keras 3 dict of args/kwargs, or the legacy nested list)
    inputs: list[TensorRef]  # every tensor it reads, flattened, in order

    @property
    def key(self) -> tuple[str, int]:
        return (self.layer.name, self.index)


@dataclass
class LayerSpec:
    name: str
    class_name: str
    raw: dict  # the layer's entry in the config, as read
    calls: list[Call] = field(default_factory=list)

    @property
    def config(self) -> dict:
        return self.raw.get("config", {}) or {}


@dataclass
class KerasGraph:
    """A functional model as data: layers in file order, inputs and outputs as tensor refs."""

    name: str
    legacy: bool  # Keras 2 / tf-keras config (list-style nodes)
    layers: dict[str, LayerSpec]
    inputs: list[TensorRef]
    outputs: list[TensorRef]
    sequential: bool = False

    def calls(self) -> Iterator[Call]:
        for layer in self.layers.values():
            yield from layer.calls

    def consumers(self) -> dict[TensorRef, list[Call]]:
        """Who reads each tensor (indexed once)."""
        readers: dict[TensorRef, list[Call]] = {}
        for call in self.calls():
            for ref in call.inputs:
                readers.setdefault(ref, []).append(call)
        return readers


@dataclass
class KerasFile:
    path: Path
    kind: str  # "keras" (Keras 3 zip) or "h5" (legacy)
    config: dict  # the top-level model config
    keras_version: str
    weights: WeightStore
    compile_config: dict | None = None  # Keras 3 compile_config / legacy training_config
    accepted: Any = None  # .keras: the archive's members as accepted within the limits (_Accepted)

    def write_accepted(self, target: Path) -> None:
        """The .keras archive exactly as accepted (Keras's loader sees nothing else of the input)."""
        if self.accepted is None:
            raise ValueError("only a .keras archive can be written back as accepted")
        self.accepted.write(target)


# -- reading the file -------------------------------------------------------------------------

def read_file(path: Path, *, weights: bool = True) -> KerasFile:
    """Open ``path`` and read its config and weights index; a broken file is a one-line BadInput.
    ``weights=False``: the same checks, the weights left unread (an empty store) for a reader that
    needs only the config (the reference process, whose Keras reads the weights itself: 0.3 s of a
    100 MB ``.h5``)."""
    if not path.is_file():
        raise BadInput(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise BadInput(f"{path}: empty file")
    if zipfile.is_zipfile(path):
        return _read_keras_zip(path, weights=weights)
    return _read_h5(path, weights=weights)


# -- archive limits ----------------------------------------------------------------------------
# A .keras file is a zip, and a zip (or the HDF5 inside it, or an .h5 file) can declare far more
# data than it holds: a 1 MB file can inflate to 1 GiB or more. Every size is checked before
# anything is read, as declared (zip headers, HDF5 dataset shapes) and as actually read.
#   - ratio: bytes inside ≤ MAX_EXPANSION_RATIO × the file's size. Real weights barely compress
#     (float32 deflates ~1.1×; a config.json ~10×), so 50× leaves wide room for any real model
#     and stops a bomb (100×–1000×+);
#   - floor: whatever its ratio, a file may hold EXPANSION_FLOOR bytes (tiny models whose
#     config dominates compress well; 64 MiB is harmless to read);
#   - absolute: MAX_TOTAL_BYTES whatever the file's size (ConvNeXtXLarge, the largest
#     keras.applications model, holds 1.4 GB; a single-file model over 8 GiB is not read);
#   - config.json/metadata.json at most MAX_CONFIG_BYTES (big configs are a few MB), at most
#     MAX_MEMBERS members.
# GCONV_KERAS_MAX_RATIO and GCONV_KERAS_MAX_BYTES (bytes) override the ratio and the absolute
# cap for files the user trusts to be real.
MAX_EXPANSION_RATIO = 50
EXPANSION_FLOOR = 64 << 20
MAX_TOTAL_BYTES = 8 << 30
MAX_CONFIG_BYTES = 64 << 20
MAX_MEMBERS = 10_000
_CHUNK = 1 << 20


def _limits() -> tuple[float, int]:
    """The ratio and the absolute cap in force (the environment may raise or lower them)."""
    import os

    try:
        ratio = float(os.environ.get("GCONV_KERAS_MAX_RATIO") or MAX_EXPANSION_RATIO)
        cap = int(float(os.environ.get("GCONV_KERAS_MAX_BYTES") or MAX_TOTAL_BYTES))
    except ValueError as exc:
        raise BadInput(f"GCONV_KERAS_MAX_RATIO/GCONV_KERAS_MAX_BYTES must be numbers ({exc})") from exc
    return ratio, cap


def expansion_limit(file_size: int) -> int:
    """How many bytes a file of ``file_size`` may hold inside (see the limits above)."""
    ratio, cap = _limits()
    return min(max(int(ratio * file_size), EXPANSION_FLOOR), cap)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _too_big(path: Path, what: str, size: int, file_size: int) -> BadInput:
    ratio, cap = _limits()
    return BadInput(f"{path}: {what} {_size(size)} inside a {_size(file_size)} file, over the limit of "
                    f"{_size(expansion_limit(file_size))} (a decompression bomb? the limits: "
                    f"{ratio:g}x the file size, at least {_size(EXPANSION_FLOOR)}, at most "
                    f"{_size(cap)}; GCONV_KERAS_MAX_RATIO/GCONV_KERAS_MAX_BYTES raise them)")


def _plain_member(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return bool(name) and not name.startswith(("/", "\\")) and ":" not in parts[0] and ".." not in parts


class _Accepted:
    """The members of an accepted .keras archive, each extracted (within the limits) into a
    private folder that lives as long as the KerasFile: what Keras's own loader may see."""

    def __init__(self):
        import weakref

        from gconv_rewrite import formats

        # The run's kind of scratch folder ($TMPDIR/gconv-<pid>-<random>): removed with this
        # object, or swept by a later run if this one is killed.
        scratch = formats.scratch_dir()
        self.folder = scratch.__enter__()
        self.members: list[tuple[zipfile.ZipInfo, Path]] = []
        self._cleanup = weakref.finalize(self, scratch.__exit__, None, None, None)

    def path(self, name: str) -> Path | None:
        return next((p for info, p in self.members if info.filename == name), None)

    def write(self, target: Path) -> None:
        """The accepted archive again: same member names, dates and compression, same bytes."""
        import shutil

        with zipfile.ZipFile(target, "w") as out:
            for info, stored in self.members:
                copy = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                copy.compress_type = info.compress_type
                copy.external_attr = info.external_attr
                with stored.open("rb") as src, out.open(copy, "w") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)


def _read_keras_zip(path: Path, *, weights: bool) -> KerasFile:
    file_size = path.stat().st_size
    limit = expansion_limit(file_size)
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            names = {info.filename for info in infos}
            if "config.json" not in names:
                raise BadInput(f"{path}: not a Keras 3 file (no config.json in the archive)")
            if "model.weights.h5" not in names:
                raise BadInput(f"{path}: the .keras archive holds no model.weights.h5 "
                               "(sharded weights are not supported)")
            if len(infos) > MAX_MEMBERS:
                raise BadInput(f"{path}: the archive holds {len(infos)} members, over the limit of {MAX_MEMBERS}")
            if len(names) != len(infos):
                raise BadInput(f"{path}: the archive holds two members of one name")
            escaping = next((info.filename for info in infos if not _plain_member(info.filename)), None)
            if escaping is not None:
                raise BadInput(f"{path}: the archive holds a member named {escaping[:60]!r}, outside the archive")
            declared = sum(info.file_size for info in infos)
            if declared > limit:
                raise _too_big(path, "the archive declares", declared, file_size)
            for name in ("config.json", "metadata.json"):
                info = archive.getinfo(name) if name in names else None
                if info is not None and info.file_size > MAX_CONFIG_BYTES:
                    raise BadInput(f"{path}: its {name} declares {_size(info.file_size)}, over the limit of "
                                   f"{_size(MAX_CONFIG_BYTES)}")
            accepted = _Accepted()
            total = 0
            for index, info in enumerate(infos):
                if info.is_dir():
                    continue
                stored = accepted.folder / f"member{index}"
                with archive.open(info) as src, stored.open("wb") as dst:
                    read = 0
                    while chunk := src.read(_CHUNK):
                        read += len(chunk)
                        total += len(chunk)
                        if read > info.file_size or total > limit:  # zipfile stops at the declared size; belt and braces
                            raise _too_big(path, "the archive inflates to over", total, file_size)
                        dst.write(chunk)
                accepted.members.append((info, stored))
            config = json.loads(accepted.path("config.json").read_bytes())
            metadata_path = accepted.path("metadata.json")
            metadata = json.loads(metadata_path.read_bytes()) if metadata_path is not None else {}
    except BadInput:
        raise
    except (zipfile.BadZipFile, json.JSONDecodeError, OSError, KeyError, EOFError, ValueError,
            NotImplementedError, RuntimeError) as exc:
        raise BadInput(f"{path}: not a readable .keras file ({one_line(exc)})") from exc
    if not isinstance(config, dict) or not isinstance(metadata, dict):
        raise BadInput(f"{path}: not a readable .keras file (its config is not a JSON object)")
    store = WeightStore.from_keras3(accepted.path("model.weights.h5"), path) if weights else WeightStore({})
    kfile = KerasFile(path, "keras", config, str(metadata.get("keras_version", "")), store,
                      compile_config=config.get("compile_config") or None)
    kfile.accepted = accepted
    return kfile


def check_h5_sizes(handle, path: Path, file_size: int, what: str = "its HDF5 datasets declare") -> None:
    """Refuse an HDF5 file whose datasets declare more data than the limits allow: a dataset's
    shape is only a promise (chunked + compressed, or never allocated, it reads as zeros)."""
    import h5py

    total = 0
    limit = expansion_limit(file_size)

    def visit(_name, item):
        nonlocal total
        if isinstance(item, h5py.Dataset):
            total += int(item.size or 0) * int(item.dtype.itemsize or 1)
            if total > limit:
                return True  # stop walking
        return None

    handle.visititems(visit)
    if total > limit:
        raise _too_big(path, what + " over", total, file_size)


def _read_h5(path: Path, *, weights: bool) -> KerasFile:
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise BadInput(f"{path}: not a Keras file (neither a .keras zip nor HDF5: {one_line(exc)})") from exc
    try:
        raw = handle.attrs.get("model_config")
        if raw is None:
            raise BadInput(f"{path}: an HDF5 file without a model config (a weights-only file?)")
        config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        check_h5_sizes(handle, path, path.stat().st_size)
        version = handle.attrs.get("keras_version", b"")
        version = version.decode() if isinstance(version, bytes) else str(version)
        store = WeightStore.from_legacy(handle, path) if weights else WeightStore({})
        training = handle.attrs.get("training_config")
        training = json.loads(training.decode() if isinstance(training, bytes) else training) if training else None
    except BadInput:
        handle.close()
        raise
    except (json.JSONDecodeError, OSError, KeyError, ValueError) as exc:
        handle.close()
        raise BadInput(f"{path}: not a readable Keras .h5 file ({one_line(exc)})") from exc
    handle.close()
    return KerasFile(path, "h5", config, version, store, compile_config=training)


class WeightStore:
    """Each layer's weights as numpy arrays, in the order the layer lists them.

    Legacy .h5 files key weights by layer name. Keras 3 keys them by *position*: the model's
    layers in order, each named after its class (``conv2d``, ``conv2d_1``…, whatever the layer's
    own name), nested models as subtrees; ``resolve`` maps those paths to layer names once the
    model's layer order is known.
    """

    def __init__(self, arrays: dict[str, list[np.ndarray]], paths: dict[str, dict] | None = None):
        self._arrays = arrays
        self._paths = paths  # Keras 3: saved subtree per path key
        self._trees: dict[str, dict] = {}

    @property
    def keras3(self) -> bool:
        return self._paths is not None

    def get(self, layer: str) -> list[np.ndarray]:
        return self._arrays.get(layer, [])

    def tree(self, layer: str) -> dict:
        """Keras 3: the layer's saved subtree ({"vars": [...], "layers": {key: subtree}})."""
        return self._trees.get(layer, {})

    def total_parameters(self) -> int:
        if self._paths is None:
            return sum(int(a.size) for arrays in self._arrays.values() for a in arrays)
        return sum(_tree_size(t) for t in self._paths.values())

    def resolve(self, layers: list[tuple[str, str]]) -> None:
        """``layers``: (name, class name) in the order the model lists its layers."""
        if self._paths is None:
            return
        for (name, _), key in zip(layers, saved_keys([c for _, c in layers])):
            tree = self._paths.get(key, {})
            self._trees[name] = tree
            self._arrays[name] = tree.get("vars", [])

    @classmethod
    def from_keras3(cls, weights_path: Path, path: Path) -> WeightStore:
        import h5py

        try:
            with h5py.File(weights_path, "r") as handle:
                # Its size was checked as a zip member; its datasets' declared sizes are checked here.
                check_h5_sizes(handle, path, path.stat().st_size, "its model.weights.h5 datasets declare")
                layers = handle.get("layers")
                paths = {name: _read_tree(layers[name]) for name in (layers.keys() if layers is not None else [])}
        except OSError as exc:
            raise BadInput(f"{path}: its model.weights.h5 is not readable ({one_line(exc)})") from exc
        return cls({}, paths)

    @classmethod
    def from_legacy(cls, handle, path: Path) -> WeightStore:
        arrays: dict[str, list[np.ndarray]] = {}
        root = handle.get("model_weights", handle)
        # tf-keras lists the layers in "layer_names": a name with "/" (MobileNetV3's
        # "Conv/BatchNorm") is a nested group, not one of the root's keys.
        listed = [n.decode() if isinstance(n, bytes) else str(n) for n in root.attrs.get("layer_names", [])]
        for name in listed or list(root.keys()):
            group = root.get(name)
            if group is None or not hasattr(group, "attrs"):
                continue
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
            arrays[name] = [np.asarray(group[n]) for n in names]
        return cls(arrays)


def saved_keys(class_names: list[str]) -> list[str]:
    """The keys Keras 3 saves a list of layers under: snake-cased class names made unique."""
    used: dict[str, int] = {}
    keys = []
    for class_name in class_names:
        key = _snake_case(class_name)
        if key in used:
            used[key] += 1
            key = f"{key}_{used[key]}"
        else:
            used[key] = 0
        keys.append(key)
    return keys


def _read_tree(group) -> dict:
    import h5py

    tree: dict[str, Any] = {"vars": [], "layers": {}, "other": {}}
    for key in group.keys():
        item = group[key]
        if key == "vars" and isinstance(item, h5py.Group):
            tree["vars"] = [np.asarray(item[k]) for k in sorted(item.keys(), key=int)]
        elif key == "layers" and isinstance(item, h5py.Group):
            tree["layers"] = {k: _read_tree(item[k]) for k in item.keys()}
        elif isinstance(item, h5py.Group):
            tree["other"][key] = _read_tree(item)
    return tree


def _tree_size(tree: dict) -> int:
    return (sum(int(a.size) for a in tree.get("vars", []))
            + sum(_tree_size(t) for t in tree.get("layers", {}).values())
            + sum(_tree_size(t) for t in tree.get("other", {}).values()))


def _snake_case(name: str) -> str:
    """keras.src.utils.naming.to_snake_case, which names the saved layer paths."""
    import re

    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


# -- the config as a graph --------------------------------------------------------------------

def model_class(config: dict) -> str:
    return str(config.get("class_name", ""))


def parse_graph(config: dict, *, legacy: bool, path: Path) -> KerasGraph:
    """The model config as a graph of layer calls (functional or Sequential). A config that is
    not the structure Keras writes (a list where a dict belongs, a short tensor reference...) is
    a one-line BadInput, never a KeyError/TypeError from deep inside."""
    try:
        return _parse_graph(config, legacy=legacy, path=path)
    except BadInput:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise BadInput(f"{path}: the model config is not a Keras model config Keras could read "
                       f"({type(exc).__name__}: {one_line(exc)})") from exc


def _parse_graph(config: dict, *, legacy: bool, path: Path) -> KerasGraph:
    if not isinstance(config, dict):
        raise BadInput(f"{path}: the model config is not a JSON object")
    body = config.get("config", {}) or {}
    if model_class(config) in SEQUENTIAL:
        return _parse_sequential(body, legacy=legacy, path=path)
    entries = body.get("layers", []) or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BadInput(f"{path}: the model config's layers are not a list of layer entries")
    layers: dict[str, LayerSpec] = {}
    # tf-keras counts a nested model's own construction as its node 0: references to it in a
    # legacy config are one higher than the position of the call in its inbound_nodes. Keras 3
    # writes its own node form ({args, kwargs}) and indexes into .h5 files too: no offsets there.
    offsets = {(entry.get("name") or ""): int(_skips_first_node(entry)) for entry in entries} \
        if legacy and not keras3_nodes(config) else {}
    for entry in entries:
        name = entry.get("name") or (entry.get("config") or {}).get("name")
        if not name or not isinstance(name, str) or name in layers:
            raise BadInput(f"{path}: the model config has a layer without a unique name")
        layer = LayerSpec(name=name, class_name=str(entry.get("class_name", "")), raw=entry)
        for index, node in enumerate(entry.get("inbound_nodes", []) or []):
            # By the node's own form: Keras 3 writes {args, kwargs} nodes into .h5 files as well.
            refs = _keras3_refs(node) if isinstance(node, dict) else _legacy_refs(node, offsets)
            layer.calls.append(Call(layer, index, node, refs))
        if layer.class_name == "InputLayer" and not layer.calls:
            layer.calls.append(Call(layer, 0, None, []))
        layers[name] = layer
    # Keras 3 counts a nested functional model's built-in node in the model's input/output
    # references only (its functional_from_config get_tensor: ``node_index -= 1``), not in
    # the keras_history of the nodes that read it.
    ends = offsets if not keras3_nodes(config) else \
        {str(entry.get("name") or ""): 1 for entry in entries if entry.get("class_name") in FUNCTIONAL}
    inputs = _shift(_endpoint_refs(body.get("input_layers", [])), ends)
    outputs = _shift(_endpoint_refs(body.get("output_layers", [])), ends)
    for ref in inputs + outputs:
        if ref.layer not in layers:
            raise BadInput(f"{path}: the model config names an unknown layer {ref.layer!r}")
    for call in (c for layer in layers.values() for c in layer.calls):
        for ref in call.inputs:
            if ref.layer not in layers or ref.node >= len(layers[ref.layer].calls):
                raise BadInput(f"{path}: layer {call.layer.name!r} reads {ref.layer!r} call {ref.node}, "
                               "which the config does not hold")
    return KerasGraph(name=str(body.get("name", "model")), legacy=legacy, layers=layers, inputs=inputs,
                      outputs=outputs)


def _parse_sequential(body: dict, *, legacy: bool, path: Path) -> KerasGraph:
    """A Sequential model as the chain it is: input → layer_1 → ... → layer_n."""
    entries = list(body.get("layers", []))
    layers: dict[str, LayerSpec] = {}
    if not entries or entries[0].get("class_name") != "InputLayer":
        shape = None
        for entry in entries[:1]:
            cfg = entry.get("config", {}) or {}
            shape = cfg.get("batch_input_shape") or cfg.get("batch_shape")
        if shape is None:
            raise BadInput(f"{path}: a Sequential model without an input shape cannot be rebuilt")
        name = f"{body.get('name', 'sequential')}_input"
        entries.insert(0, {"class_name": "InputLayer",
                           "config": {"batch_shape": shape, "dtype": "float32", "name": name}, "name": name})
    previous: TensorRef | None = None
    for entry in entries:
        name = (entry.get("config") or {}).get("name") or entry.get("name")
        if not name or name in layers:
            raise BadInput(f"{path}: the model config has a layer without a unique name")
        entry = {**entry, "name": name}
        layer = LayerSpec(name=name, class_name=str(entry.get("class_name", "")), raw=entry)
        layer.calls.append(Call(layer, 0, None, [previous] if previous else []))
        layers[name] = layer
        previous = TensorRef(name, 0, 0)
    first = next(iter(layers))
    return KerasGraph(name=str(body.get("name", "sequential")), legacy=legacy, layers=layers,
                      inputs=[TensorRef(first, 0, 0)], outputs=[previous], sequential=True)


def lambda_names(config: Any) -> list[str]:
    """Every Lambda layer anywhere in a config, nested models included."""
    found: list[str] = []

    def walk(item):
        if isinstance(item, dict):
            if item.get("class_name") == "Lambda":
                found.append(str(item.get("name") or (item.get("config") or {}).get("name") or "lambda"))
            for value in item.values():
                walk(value)
        elif isinstance(item, list):
            for value in item:
                walk(value)

    walk(config)
    return found


def _endpoint_refs(data) -> list[TensorRef]:
    """``input_layers``/``output_layers``: one [name, node, tensor] or a (nested) list of them."""
    if isinstance(data, list) and len(data) == 3 and isinstance(data[0], str):
        return [TensorRef(data[0], int(data[1]), int(data[2]))]
    refs: list[TensorRef] = []
    for item in data or []:
        refs.extend(_endpoint_refs(item))
    return refs


def _is_legacy_leaf(item) -> bool:
    return isinstance(item, list) and len(item) in (3, 4) and isinstance(item[0], str) \
        and isinstance(item[1], int) and isinstance(item[2], int)


# tf-keras writes a first call argument that is no Keras tensor (``1.0 - x``) as this leaf.
CONSTANT_VALUE = "_CONSTANT_VALUE"


def is_constant_leaf(item) -> bool:
    return isinstance(item, list) and len(item) in (3, 4) and item[0] == CONSTANT_VALUE and item[1] == -1


def legacy_leaves(node) -> list[list]:
    """The [layer, node, tensor, kwargs] entries of a legacy node, flattened (tf-keras's
    [_CONSTANT_VALUE, -1, value, kwargs] entries too: they carry the call's kwargs)."""
    if _is_legacy_leaf(node) or is_constant_leaf(node):
        return [node]
    leaves = []
    for item in node if isinstance(node, list) else []:
        leaves.extend(legacy_leaves(item))
    return leaves


def legacy_kwargs(node) -> dict:
    """The kwargs of a legacy node (tf-keras repeats them on every leaf; the last one is read)."""
    leaves = legacy_leaves(node)
    kwargs = leaves[-1][3] if leaves and len(leaves[-1]) == 4 else {}
    return dict(kwargs) if isinstance(kwargs, dict) else {}


def kwarg_refs(value) -> list[list]:
    """Tensor references inside legacy kwargs: ``[layer, node, tensor]`` lists, as tf-keras's
    own reader finds them (a list of 3 or 4 whose first item is a string)."""
    if isinstance(value, list) and len(value) in (3, 4) and isinstance(value[0], str) \
            and isinstance(value[1], int) and isinstance(value[2], int) and value[0] != CONSTANT_VALUE:
        return [value]
    found: list[list] = []
    for item in (value.values() if isinstance(value, dict) else value if isinstance(value, list) else []):
        found.extend(kwarg_refs(item))
    return found


def _legacy_refs(node, offsets: dict[str, int] | None = None) -> list[TensorRef]:
    """Every tensor a legacy node reads: the first argument's, then those passed by keyword
    (tf-keras's ``x + y`` is ``tf.__operators__.add(x, y=[layer, node, tensor])``)."""
    leaves = [leaf for leaf in legacy_leaves(node) if not is_constant_leaf(leaf)]
    refs = [TensorRef(leaf[0], leaf[1], leaf[2]) for leaf in leaves]
    refs += [TensorRef(r[0], r[1], r[2]) for r in kwarg_refs(legacy_kwargs(node))]
    return _shift(refs, offsets or {})


def first_arg_count(node) -> int:
    """How many of a legacy node's refs are its first argument's tensors (the rest are kwargs')."""
    return sum(1 for leaf in legacy_leaves(node) if not is_constant_leaf(leaf))


def _shift(refs: list[TensorRef], offsets: dict[str, int]) -> list[TensorRef]:
    return [TensorRef(r.layer, r.node - offsets.get(r.layer, 0), r.tensor) for r in refs]


def _skips_first_node(entry: dict) -> bool:
    """tf-keras's _should_skip_first_node: a nested functional model that starts with an input."""
    if entry.get("class_name") not in FUNCTIONAL + SEQUENTIAL:
        return False
    inner = (entry.get("config") or {}).get("layers") or []
    return bool(inner) and inner[0].get("class_name") == "InputLayer"


def keras3_nodes(config: dict) -> bool:
    """Does this (top-level) config write its nodes in Keras 3 form ({args, kwargs}), as Keras 3
    does in .keras and .h5 files alike? (tf-keras / Keras 2 nodes are nested lists.)"""
    for entry in ((config.get("config") or {}).get("layers") or []):
        for node in (entry.get("inbound_nodes") or []) if isinstance(entry, dict) else []:
            return isinstance(node, dict)
    return False


def _keras3_refs(node) -> list[TensorRef]:
    refs: list[TensorRef] = []

    def walk(item):
        if isinstance(item, dict):
            if item.get("class_name") == "__keras_tensor__":
                history = (item.get("config") or {}).get("keras_history")
                if history:
                    if not (isinstance(history, list) and len(history) == 3 and isinstance(history[0], str)):
                        raise ValueError(f"a Keras tensor reference is not [layer, node, tensor]: "
                                         f"{json.dumps(history)[:60]}")
                    refs.append(TensorRef(history[0], int(history[1]), int(history[2])))
                return
            for value in item.values():
                walk(value)
        elif isinstance(item, list):
            for value in item:
                walk(value)

    walk(node)
    return refs


def keras3_tensor_shape(node, position: int = 0) -> list[int | None] | None:
    """The shape a Keras 3 node records for its ``position``-th input tensor."""
    found: list = []

    def walk(item):
        if isinstance(item, dict):
            if item.get("class_name") == "__keras_tensor__":
                found.append((item.get("config") or {}).get("shape"))
                return
            for value in item.values():
                walk(value)
        elif isinstance(item, list):
            for value in item:
                walk(value)

    walk(node)
    return found[position] if len(found) > position else None
