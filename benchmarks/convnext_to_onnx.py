"""Acceptance check: keras.applications ConvNeXtTiny → SavedModel → ``gconv-rewrite --to onnx``.

    python benchmarks/convnext_to_onnx.py [--softmax] [--keep DIR]

ConvNeXt's depthwise ``Conv2D(groups=channels)`` layers are XLA-compiled by Keras on CPU, and its
exact GELU uses ``Erfc``: tf2onnx alone (and ``keras.Model.export(format="onnx")``) leaves
``StatefulPartitionedCall`` nodes onnxruntime refuses. This builds the model (random weights),
saves it as ``.keras`` and exports a SavedModel, converts the SavedModel with the CLI, then checks
independently of the tool: onnx.checker, no call nodes, native grouped Convs, onnxruntime output
within 1e-4 of Keras's own ``predict``. Takes about a minute; too slow for the test suite.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    import shutil

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--softmax", action="store_true", help="compare probabilities, not logits")
    parser.add_argument("--keep", type=Path, help="keep the models in this folder")
    args = parser.parse_args()

    folder = args.keep or Path(tempfile.mkdtemp(prefix="gconv-convnext-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return _check(folder, args.softmax)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


def _check(folder: Path, softmax: bool) -> int:
    import keras
    import numpy as np
    import onnx
    import onnxruntime as ort

    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    model = keras.applications.ConvNeXtTiny(weights=None, classifier_activation="softmax" if softmax else None)
    model.save(folder / "convnext_tiny.keras")
    saved_model = folder / "convnext_tiny"
    model.export(str(saved_model), verbose=False)
    print(f"built, saved (.keras) and exported (SavedModel) in {time.perf_counter() - start:.1f}s")

    key = "keras_tensor"  # the input name Keras gives the exported signature
    output = folder / "convnext_tiny.onnx"
    output.unlink(missing_ok=True)
    start = time.perf_counter()
    cli = subprocess.run([sys.executable, "-m", "gconv_rewrite", str(saved_model), "--to", "onnx", "-o", str(output),
                          "--shape", f"{key}=1,224,224,3"], capture_output=True, text=True, cwd=REPO)
    print(cli.stdout.rstrip())
    print(f"CLI exit {cli.returncode} in {time.perf_counter() - start:.1f}s")
    if cli.returncode != 0:
        print(cli.stderr[-2000:])
        return 1

    onnx_model = onnx.load(str(output))
    onnx.checker.check_model(onnx_model, full_check=True)
    ops = collections.Counter(n.op_type for n in onnx_model.graph.node)
    calls = [n for n in onnx_model.graph.node if "PartitionedCall" in n.op_type]
    groups = collections.Counter(next((a.i for a in n.attribute if a.name == "group"), 1)
                                 for n in onnx_model.graph.node if n.op_type == "Conv")
    x = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    want = model.predict(x, verbose=0)
    error = float(np.abs(got - want).max())
    print(f"onnx.checker: ok; call nodes: {len(calls)}; Conv by group: {dict(sorted(groups.items()))}; "
          f"Erfc: {ops.get('Erfc', 0)}, Erf: {ops.get('Erf', 0)}")
    print(f"onnxruntime vs keras predict (batch 2, {'probabilities' if softmax else 'logits'}): "
          f"max abs error {error:.3g} (|output| max {float(np.abs(want).max()):.3g})")
    ok = not calls and sum(c for g, c in groups.items() if g > 1) == 18 and error < 1e-4
    print("ACCEPTANCE: " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
