"""Grouped vs expanded SavedModel latency in TensorFlow on CPU, with oneDNN off and on.

    python benchmarks/tf_expand.py [--quick] [--groups 32] [--rounds 30]

TF 2.21 on CPU with oneDNN off (``TF_ENABLE_ONEDNN_OPTS=0``, also the default on CPUs without
AVX-512) cannot run a grouped ``Conv2D + BiasAdd (+ Relu)``: grappler fuses it into
``_FusedConv2D``, whose kernel refuses grouped filters. Keras hides this by compiling each
grouped conv with XLA. This script builds a ResNeXt-like Keras stack, exports it, and times, in
one subprocess per oneDNN setting (the variable must be set before TensorFlow is imported),
interleaved round by round:

- ``keras (XLA)``: the SavedModel Keras exported (grouped convs XLA-compiled);
- ``grouped``: the same graph frozen and inlined, bias as BiasAdd (what the fusion of a
  hand-made model would naively write);
- ``grouped, bias as AddV2``: what ``gconv-rewrite`` writes for a grouped conv (runs everywhere);
- ``expanded``: ``gconv-rewrite --expand`` (Split → N Conv2D → ConcatV2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORKER = r"""
import json, statistics, sys, time
import numpy as np, tensorflow as tf
paths, shape, rounds = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
x = tf.constant(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
functions, results = {}, {}
for name, path in paths.items():
    fn = tf.saved_model.load(path).signatures["serving_default"]
    key = list(fn.structured_input_signature[1])[0]
    try:
        for _ in range(3):
            fn(**{key: x})
        functions[name] = (fn, key)
    except Exception as exc:
        results[name] = {"error": str(exc).strip().splitlines()[-2].strip()[:120]}
times = {name: [] for name in functions}
for _ in range(rounds):
    for name, (fn, key) in functions.items():
        start = time.perf_counter()
        fn(**{key: x})
        times[name].append(time.perf_counter() - start)
for name, samples in times.items():
    q = np.percentile(samples, [25, 50, 75])
    results[name] = {"median_ms": q[1] * 1e3, "iqr_ms": (q[2] - q[0]) * 1e3}
print("RESULTS" + json.dumps(results))
"""


def build(work: Path, groups: int, image: int, channels: int, blocks: int) -> Path:
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((image, image, channels), name="image")
    y = inputs
    for i in range(blocks):
        y = keras.layers.Conv2D(channels, 3, padding="same", groups=groups, activation="relu",
                                bias_initializer="random_normal", name=f"grouped{i}")(y)
        y = keras.layers.Conv2D(channels, 1, activation="relu", name=f"pointwise{i}")(y)
    model = keras.Model(inputs, y)
    path = work / "keras_export"
    model.export(str(path), verbose=False)
    return path


def variants(work: Path, exported: Path, shape: list[int]) -> dict[str, Path]:
    import gconv_rewrite
    from gconv_rewrite.passes.tf.savedmodel import load_signature, write_savedmodel

    frozen = load_signature(exported)
    paths = {"keras (XLA)": exported}
    write_savedmodel(frozen, frozen.graph_def, work / "grouped", keep_tf_runnable=False)
    paths["grouped"] = work / "grouped"
    write_savedmodel(frozen, frozen.graph_def, work / "grouped_add")
    paths["grouped, bias as AddV2"] = work / "grouped_add"
    result = gconv_rewrite.expand(exported, output=work / "expanded", shapes={"image": shape})
    print(f"expanded: {len(result.report.rewrites)} grouped convs, verification "
          f"{'passed' if result.report.verification.passed else 'FAILED'}")
    paths["expanded"] = work / "expanded"
    return paths


def measure(paths: dict[str, Path], shape: list[int], rounds: int, onednn: str) -> dict:
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run([sys.executable, "-c", WORKER, json.dumps({k: str(v) for k, v in paths.items()}),
                          json.dumps(shape), str(rounds)], env=env, capture_output=True, text=True, timeout=1200)
    line = next((l for l in run.stdout.splitlines() if l.startswith("RESULTS")), None)
    if line is None:
        raise SystemExit(f"worker failed:\n{run.stdout}\n{run.stderr[-2000:]}")
    return json.loads(line[len("RESULTS"):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small image, few rounds")
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    image, rounds = (28, 10) if args.quick else (56, args.rounds or 30)
    channels, blocks = 256, 4
    shape = [1, image, image, channels]
    with tempfile.TemporaryDirectory(prefix="gconv-bench-") as scratch:
        work = Path(scratch)
        paths = variants(work, build(work, args.groups, image, channels, blocks), shape)
        figures = {setting: measure(paths, shape, rounds, flag) for setting, flag in (("off", "0"), ("on", "1"))}
    print(f"\nTF CPU latency, input {'x'.join(map(str, shape))}, {blocks} blocks of Conv2D(groups={args.groups}) "
          f"+ 1x1, median of {rounds} interleaved rounds (ms, ± half IQR)\n")
    print("| variant | oneDNN off | oneDNN on |")
    print("|---|---|---|")
    for name in paths:
        cells = []
        for setting in ("off", "on"):
            r = figures[setting][name]
            cells.append(f"fails: {r['error']}" if "error" in r else f"{r['median_ms']:.2f} ± {r['iqr_ms'] / 2:.2f}")
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
