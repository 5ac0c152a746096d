"""Real tf-keras models holding TFOpLambda layers through the CLI: --check, --fuse, --expand and
the expand → fuse round trip, each timed, each output checked against tf-keras's own run of the
original file (independently of the tool's verification, which compares with its Keras 3 rebuild).

    python benchmarks/tf_keras_tfoplambdas.py --only RegNetX002,MobileNetV3Small --input-size 0 --save /tmp/apps
    python benchmarks/tf_keras_apps.py /tmp/apps/RegNetX002.h5 /tmp/apps/MobileNetV3Small.keras
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def cli(*args) -> tuple[int, float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gconv_rewrite", *map(str, args)], capture_output=True, text=True)
    return done.returncode, time.perf_counter() - start, done.stdout + done.stderr


def grouped(path: Path) -> int:
    import keras

    model = keras.models.load_model(path, compile=False, safe_mode=True)
    return sum(1 for layer in model.layers if type(layer).__name__ == "Conv2D" and layer.groups > 1)


def against_tf_keras(original: Path, written: Path) -> float:
    """Max abs difference between tf-keras running the original and Keras 3 running ``written``."""
    import keras
    import numpy as np
    import tf_keras
    from tf_keras.src.applications import convnext

    reference = tf_keras.models.load_model(original, compile=False, custom_objects={
        "LayerScale": convnext.LayerScale, "StochasticDepth": convnext.StochasticDepth})
    shape = [d if d is not None else (224 if i in (1, 2) else 1) for i, d in enumerate(reference.inputs[0].shape)]
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    expected = np.asarray(reference(x, training=False))
    actual = np.asarray(keras.models.load_model(written, compile=False, safe_mode=True)(x, training=False))
    return float(np.max(np.abs(expected - actual)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("/tmp/gconv-apps-out"))
    parser.add_argument("--keep-depthwise", action="store_true", help="pass --keep-depthwise to --expand")
    parser.add_argument("--shape", action="append", default=[], help="passed to every run (NAME=D0,D1,...)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print("model                       step            exit  time    verification  vs tf-keras  grouped")
    worst = 0
    for model in args.models:
        stem = model.name.replace(".", "_")
        fused, expanded, refused = (args.out / f"{stem}.{k}.keras" for k in ("fused", "expanded", "refused"))
        expand_flags = ["--keep-depthwise"] if args.keep_depthwise else []
        steps = [("--check", [model, "--check"], None),
                 ("--fuse", [model, "--fuse", "-o", fused, "--force"], fused),
                 ("--expand", [model, "--expand", *expand_flags, "-o", expanded, "--force"], expanded),
                 ("expand→fuse", [expanded, "--fuse", "-o", refused, "--force"], refused)]
        shapes = [flag for shape in args.shape for flag in ("--shape", shape)]
        for label, command, written in steps:
            code, seconds, text = cli(*command, *shapes)
            worst = max(worst, code if label != "--check" else (2 if code == 2 else 0))
            status = re.search(r"^verification: (\w+)", text, re.M)
            difference = grouped_count = ""
            if written is not None and code == 0 and written.exists():
                difference = f"{against_tf_keras(model, written):.2e}"
                grouped_count = str(grouped(written))
            elif code not in (0, 1):
                status = None
                difference = text.strip().splitlines()[-1][:60]
            print(f"{model.name:27s} {label:15s} {code:4d}  {seconds:6.1f}s  "
                  f"{status.group(1) if status else '-':12s}  {difference:11s}  {grouped_count}", flush=True)
    return worst


if __name__ == "__main__":
    sys.exit(main())
