"""Read a Keras file without running any of it: the model config as a graph of layer calls,
and the weights as numpy arrays per layer.

    .keras (Keras 3): a zip of config.json + model.weights.h5 (layers/NAME/vars/I)
    .h5 (Keras 2 / tf-keras): attribute model_config (JSON) + group model_weights/NAME/...

Nothing here imports TensorFlow or Keras, unmarshals code or calls ``from_config``: the graph
is read as JSON, so a file whose Lambdas must not run can still be inspected and refused.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from rewriter.errors import BadInput

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

    layer: "LayerSpec"
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
    weights: "WeightStore"
    compile_config: dict | None = None  # Keras 3 compile_config / legacy training_config


# -- reading the file -------------------------------------------------------------------------

def read_file(path: Path) -> KerasFile:
    """Open ``path`` and read its config and weights index; a broken file is a one-line BadInput."""
    if not path.is_file():
        raise BadInput(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise BadInput(f"{path}: empty file")
    if zipfile.is_zipfile(path):
        return _read_keras_zip(path)
    return _read_h5(path)


def _read_keras_zip(path: Path) -> KerasFile:
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "config.json" not in names:
                raise BadInput(f"{path}: not a Keras 3 file (no config.json in the archive)")
            config = json.loads(archive.read("config.json"))
            metadata = json.loads(archive.read("metadata.json")) if "metadata.json" in names else {}
            weights_bytes = archive.read("model.weights.h5") if "model.weights.h5" in names else None
    except BadInput:
        raise
    except (zipfile.BadZipFile, json.JSONDecodeError, OSError, KeyError) as exc:
        raise BadInput(f"{path}: not a readable .keras file ({_one_line(exc)})") from exc
    if weights_bytes is None:
        raise BadInput(f"{path}: the .keras archive holds no model.weights.h5 (sharded weights are not supported)")
    return KerasFile(path, "keras", config, str(metadata.get("keras_version", "")),
                     WeightStore.from_keras3(io.BytesIO(weights_bytes), path),
                     compile_config=config.get("compile_config") or None)


def _read_h5(path: Path) -> KerasFile:
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise BadInput(f"{path}: not a Keras file (neither a .keras zip nor HDF5: {_one_line(exc)})") from exc
    try:
        raw = handle.attrs.get("model_config")
        if raw is None:
            raise BadInput(f"{path}: an HDF5 file without a model config (a weights-only file?)")
        config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        version = handle.attrs.get("keras_version", b"")
        version = version.decode() if isinstance(version, bytes) else str(version)
        weights = WeightStore.from_legacy(handle, path)
        training = handle.attrs.get("training_config")
        training = json.loads(training.decode() if isinstance(training, bytes) else training) if training else None
    except BadInput:
        handle.close()
        raise
    except (json.JSONDecodeError, OSError, KeyError, ValueError) as exc:
        handle.close()
        raise BadInput(f"{path}: not a readable Keras .h5 file ({_one_line(exc)})") from exc
    handle.close()
    return KerasFile(path, "h5", config, version, weights, compile_config=training)


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
    def from_keras3(cls, stream, path: Path) -> "WeightStore":
        import h5py

        try:
            with h5py.File(stream, "r") as handle:
                layers = handle.get("layers")
                paths = {name: _read_tree(layers[name]) for name in (layers.keys() if layers is not None else [])}
        except OSError as exc:
            raise BadInput(f"{path}: its model.weights.h5 is not readable ({_one_line(exc)})") from exc
        return cls({}, paths)

    @classmethod
    def from_legacy(cls, handle, path: Path) -> "WeightStore":
        arrays: dict[str, list[np.ndarray]] = {}
        root = handle.get("model_weights", handle)
        for name in root.keys():
            group = root[name]
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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


# -- the config as a graph --------------------------------------------------------------------

def model_class(config: dict) -> str:
    return str(config.get("class_name", ""))


def parse_graph(config: dict, *, legacy: bool, path: Path) -> KerasGraph:
    """The model config as a graph of layer calls (functional or Sequential)."""
    body = config.get("config", {}) or {}
    if model_class(config) in SEQUENTIAL:
        return _parse_sequential(body, legacy=legacy, path=path)
    layers: dict[str, LayerSpec] = {}
    # tf-keras counts a nested model's own construction as its node 0: references to it in a
    # legacy config are one higher than the position of the call in its inbound_nodes.
    offsets = {(entry.get("name") or ""): int(_skips_first_node(entry)) for entry in body.get("layers", [])} \
        if legacy else {}
    for entry in body.get("layers", []):
        name = entry.get("name") or (entry.get("config") or {}).get("name")
        if not name or name in layers:
            raise BadInput(f"{path}: the model config has a layer without a unique name")
        layer = LayerSpec(name=name, class_name=str(entry.get("class_name", "")), raw=entry)
        for index, node in enumerate(entry.get("inbound_nodes", []) or []):
            refs = _legacy_refs(node, offsets) if legacy or isinstance(node, list) else _keras3_refs(node)
            layer.calls.append(Call(layer, index, node, refs))
        if layer.class_name == "InputLayer" and not layer.calls:
            layer.calls.append(Call(layer, 0, None, []))
        layers[name] = layer
    inputs = _shift(_endpoint_refs(body.get("input_layers", [])), offsets)
    outputs = _shift(_endpoint_refs(body.get("output_layers", [])), offsets)
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


def legacy_leaves(node) -> list[list]:
    """The [layer, node, tensor, kwargs] entries of a legacy node, flattened."""
    if _is_legacy_leaf(node):
        return [node]
    leaves = []
    for item in node if isinstance(node, list) else []:
        leaves.extend(legacy_leaves(item))
    return leaves


def _legacy_refs(node, offsets: dict[str, int] | None = None) -> list[TensorRef]:
    return _shift([TensorRef(leaf[0], leaf[1], leaf[2]) for leaf in legacy_leaves(node)], offsets or {})


def _shift(refs: list[TensorRef], offsets: dict[str, int]) -> list[TensorRef]:
    return [TensorRef(r.layer, r.node - offsets.get(r.layer, 0), r.tensor) for r in refs]


def _skips_first_node(entry: dict) -> bool:
    """tf-keras's _should_skip_first_node: a nested functional model that starts with an input."""
    if entry.get("class_name") not in FUNCTIONAL + SEQUENTIAL:
        return False
    inner = (entry.get("config") or {}).get("layers") or []
    return bool(inner) and inner[0].get("class_name") == "InputLayer"


def _keras3_refs(node) -> list[TensorRef]:
    refs: list[TensorRef] = []

    def walk(item):
        if isinstance(item, dict):
            if item.get("class_name") == "__keras_tensor__":
                history = (item.get("config") or {}).get("keras_history")
                if history:
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
