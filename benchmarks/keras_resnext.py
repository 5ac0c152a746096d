"""Acceptance benchmark for Keras: a ResNeXt-50 (32x4d) written the legacy way — every grouped
3×3 conv as 32 Lambda slices → Conv2D → Concatenate, saved by tf-keras as .h5 — converted with
``--trust-lambdas`` to native ``Conv2D(groups=32)``; prints the structure, the error and the
Keras latency before and after.

    python benchmarks/keras_resnext.py [--size 224] [--runs 10] [--batch 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def latency(model, x, runs: int) -> dict[str, float]:
    """Wall time of one inference, median and best of ``runs`` after warm-up: ``graph`` through
    ``tf.function`` (what ``model.predict`` runs), ``eager`` calling the model directly (Keras 3
    re-traces its XLA-compiled grouped conv on CPU at every eager call)."""
    import tensorflow as tf

    def timed(call) -> tuple[float, float]:
        for _ in range(2):
            np_out = call(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            np_out = call(x)
            _ = np_out.numpy() if hasattr(np_out, "numpy") else np_out
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times), 1000 * min(times)

    graph = tf.function(lambda t: model(t, training=False))
    graph_median, graph_best = timed(graph)
    eager_median, eager_best = timed(lambda t: model(t, training=False))
    return {"median_ms": graph_median, "best_ms": graph_best, "eager_median_ms": eager_median,
            "eager_best_ms": eager_best}


def run(size: int = 224, runs: int = 10, batch: int = 1, folder: Path | None = None, timing: bool = True) -> dict:
    """Build the model, convert it, check the result; with ``timing``, also time both in Keras."""
    import keras
    import numpy as np

    from gconv_rewrite.api import Options, fuse
    from gconv_rewrite.passes.keras import _build, _config, _lambdas
    from samples.keras_models import resnext50_lambda_model

    with tempfile.TemporaryDirectory(prefix="gconv-resnext-") as scratch:
        folder = folder or Path(scratch)
        source = folder / "resnext50_lambda.h5"
        output = folder / "resnext50_lambda.fused.keras"
        start = time.perf_counter()
        resnext50_lambda_model(source, size=size)
        build_s = time.perf_counter() - start

        start = time.perf_counter()
        result = fuse(source, output=output, options=Options(trust_lambdas=True, force=True))
        convert_s = time.perf_counter() - start
        report = result.report

        fused = keras.models.load_model(output, safe_mode=True)
        grouped = [layer for layer in fused.layers if type(layer).__name__ == "Conv2D" and layer.groups == 32]
        lambdas_left = sum(type(layer).__name__ == "Lambda" for layer in fused.layers)

        x = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype("float32")
        before = after = dict.fromkeys(["median_ms", "best_ms", "eager_median_ms", "eager_best_ms"], float("nan"))
        diff = float("nan")
        if timing:
            # "Before" in the same runtime: the original graph rebuilt in Keras 3 with its Lambdas
            # (Keras 3.15 itself cannot load the file: its Lambdas bind with default arguments).
            kfile = _config.read_file(source)
            graph = _config.parse_graph(kfile.config, legacy=True, path=source)
            functions = {name: _lambdas.make_function(_lambdas.lambda_source(layer))
                         for name, layer in graph.layers.items() if layer.class_name == "Lambda"}
            original = _build.build(graph, _build.BuildOptions(lambda_functions=functions))
            _build.load_weights(original, graph, kfile.weights)
            before = latency(original.model, x, runs)
            after = latency(fused, x, runs)
            diff = float(np.max(np.abs(np.asarray(original.model(x, training=False))
                                       - np.asarray(fused(x, training=False)))))
        verification = report.verification
        return {
            "input": f"{batch}x{size}x{size}x3",
            "layers_before": report.before.nodes, "layers_after": report.after.nodes,
            "ops_before": report.before.op_counts, "ops_after": report.after.op_counts,
            "rewrites": len(report.rewrites), "grouped_conv2d_32": len(grouped), "lambdas_left": lambdas_left,
            "verification_passed": verification.passed,
            "max_abs_error": max(o.max_abs_error for o in verification.outputs),
            "max_abs_error_bench_input": diff,
            "keras_latency_before_ms": before, "keras_latency_after_ms": after,
            "speedup_median": before["median_ms"] / after["median_ms"],
            "seconds": {"build_fixture": build_s, "convert": convert_s, **report.timings},
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = run(args.size, args.runs, args.batch)
    ops_b, ops_a = results["ops_before"], results["ops_after"]
    print(f"ResNeXt-50 32x4d (legacy Lambda groups, tf-keras .h5), input {results['input']}")
    print(f"  layers: {results['layers_before']} -> {results['layers_after']}   "
          f"Lambda {ops_b.get('Lambda', 0)} -> {ops_a.get('Lambda', 0)}, Conv2D {ops_b.get('Conv2D', 0)} -> "
          f"{ops_a.get('Conv2D', 0)}, Concatenate {ops_b.get('Concatenate', 0)} -> {ops_a.get('Concatenate', 0)}")
    print(f"  rewrites: {results['rewrites']}   Conv2D(groups=32): {results['grouped_conv2d_32']}   "
          f"Lambdas left: {results['lambdas_left']}")
    print(f"  verification: {'passed' if results['verification_passed'] else 'FAILED'}, "
          f"max abs error {results['max_abs_error']:.3g} (bench input: {results['max_abs_error_bench_input']:.3g})")
    b, a = results["keras_latency_before_ms"], results["keras_latency_after_ms"]
    print(f"  Keras latency, batch {args.batch}, median of {args.runs} (tf.function, as model.predict runs): "
          f"before {b['median_ms']:.1f} ms, after {a['median_ms']:.1f} ms  (x{results['speedup_median']:.2f})")
    print(f"  Keras latency, eager model(x): before {b['eager_median_ms']:.1f} ms, after "
          f"{a['eager_median_ms']:.1f} ms  (Keras 3 re-traces grouped convs on CPU at every eager call)")
    print("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in results["seconds"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
