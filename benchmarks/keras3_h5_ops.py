"""Which ``keras.ops`` operations Keras 3 writes into a legacy ``.h5`` config, and whether Keras 3
loads such a file back.

A functional Keras 3 model that calls an operation on a KerasTensor (``x + 3.0``, ``x * y``,
``x[..., :4]``) holds it as a node; ``.keras`` records its module (``keras.src.ops.numpy``), the
legacy ``.h5`` writer does not: ``{"class_name": "Add", "config": {"name": "add"}}``. Builds
``keras.applications`` models with random weights (``weights=None``, no download), saves each as
``.h5``, lists the operation entries of its config (a config without ``trainable``: every Keras 3
layer writes it, no operation does) with their call forms, and tries ``keras.models.load_model``.

    python benchmarks/keras3_h5_ops.py                       # the candidates below, ~1-2 min
    python benchmarks/keras3_h5_ops.py --only MobileNetV3Small --save /tmp/k3h5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gconv_rewrite.passes.keras._build import call_form

CANDIDATES = {  # name: input shape (small: random weights, nothing downloaded)
    "MobileNetV3Small": (64, 64, 3), "MobileNetV3Large": (64, 64, 3), "EfficientNetB0": (64, 64, 3),
    "EfficientNetV2B0": (64, 64, 3), "ConvNeXtTiny": (64, 64, 3), "ResNet50V2": (64, 64, 3),
    "MobileNetV2": (64, 64, 3),
    "DenseNet121": (64, 64, 3), "Xception": (71, 71, 3), "NASNetMobile": (224, 224, 3),
    "InceptionResNetV2": (75, 75, 3),
}


def survey(name: str, shape, save: Path | None) -> dict:
    import h5py
    import keras

    model = getattr(keras.applications, name)(weights=None, input_shape=shape)
    folder = save or Path(tempfile.mkdtemp())
    path = folder / f"{name}.keras3.h5"
    model.save(path)
    with h5py.File(path, "r") as handle:
        config = json.loads(handle.attrs["model_config"])
    forms: Counter = Counter()
    for entry in config["config"]["layers"]:
        cfg = entry.get("config") or {}
        if entry.get("class_name") != "InputLayer" and "trainable" not in cfg:
            for node in entry.get("inbound_nodes", []):
                forms[f"{entry['class_name']}{call_form(node)}"] += 1
    try:
        keras.models.load_model(path, compile=False)
        loads = "yes"
    except Exception as exc:
        loads = f"no: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]}"
    if save is None:
        path.unlink()
    del model
    keras.backend.clear_session()
    gc.collect()
    return {"model": name, "operations": dict(forms), "keras_load_model": loads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated model names (default: the candidates)")
    parser.add_argument("--save", type=Path, help="keep the .h5 files in this folder")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(CANDIDATES)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            result = survey(name, CANDIDATES.get(name, (64, 64, 3)), args.save)
        except Exception as exc:  # not in this Keras, or not buildable at that size
            result = {"model": name, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]}"}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
