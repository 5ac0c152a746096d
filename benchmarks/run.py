"""gconv-rewrite benchmarks: inference speed, rewrite cost, scale, verification cost.

    python benchmarks/run.py [--quick] [--json results.json] [--only SECTION ...]

Every figure that matters is a ratio taken side by side in one run (this machine is shared and
noisy: absolute times drift, ratios much less). Latencies are measured interleaved — one run of
each variant per round — so that drift hits every variant alike, in ``SESSIONS`` fresh sessions per
model (two sessions of one model differ by up to 15 %): each ratio is taken per session set and
given with the 95 % t interval across them. Prints a Markdown table and
writes JSON (default benchmarks/results/latest.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import onnx
import onnxruntime as ort

import gconv_rewrite
from gconv_rewrite.benchmark import SESSIONS, ratio_interval
from samples.models import GraphBuilder, resnext50


def summary(samples: list[float]) -> dict:
    q = np.percentile(samples, [25, 50, 75])
    return {"median": float(q[1]), "iqr": float(q[2] - q[0]), "n": len(samples)}


def fmt_ms(s: dict) -> str:
    return f"{s['median'] * 1e3:.2f} ms ± {s['iqr'] * 1e3 / 2:.2f}"


def session(path: Path, optimized: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_latency(paths: dict[str, Path], feeds: dict, rounds: int, warmup: int = 3) -> dict[str, dict]:
    """Median latency per model over ``SESSIONS`` fresh sessions each (issue 20: two sessions of one
    model differ by up to 15 %): per session set, every model gets a new session (the creation
    order rotates), a warm-up, then ``rounds / SESSIONS`` rounds of one run each, the order within a
    round reversed every other round. Each result keeps its per-session medians (``sessions_ms``)
    so that a ratio can be taken per session set (``ratio``)."""
    return interleaved_latency_feeds(paths, {name: feeds for name in paths}, rounds, warmup)


def interleaved_latency_feeds(paths: dict[str, Path], feeds: dict[str, dict], rounds: int,
                              warmup: int = 3) -> dict[str, dict]:
    """As ``interleaved_latency``, with each model's own feeds (input name and layout)."""
    names = list(paths)
    times = {name: [] for name in names}
    per_session = {name: [] for name in names}
    for index in range(SESSIONS):
        order = names[index % len(names):] + names[:index % len(names)]
        sessions = {name: session(paths[name]) for name in order}
        for name in order:
            for _ in range(warmup):
                sessions[name].run(None, feeds[name])
        this = {name: [] for name in names}
        for round_index in range(max(3, math.ceil(rounds / SESSIONS))):
            for name in (order if round_index % 2 == 0 else order[::-1]):
                start = time.perf_counter()
                sessions[name].run(None, feeds[name])
                this[name].append(time.perf_counter() - start)
        for name in names:
            times[name] += this[name]
            per_session[name].append(statistics.median(this[name]))
        del sessions
    return {name: {**summary(times[name]), "sessions_ms": [t * 1e3 for t in per_session[name]]} for name in names}


def ratio(latency: dict[str, dict], numerator: str, denominator: str) -> dict:
    """numerator / denominator per session set, their geometric mean and its 95 % t interval
    (``gconv_rewrite.benchmark.ratio_interval``): {"ratio", "ci", "pairs"}."""
    pairs = [a / b for a, b in zip(latency[numerator]["sessions_ms"], latency[denominator]["sessions_ms"])]
    mean, low, high = ratio_interval(pairs)
    return {"ratio": mean, "ci": [low, high], "pairs": pairs}


def fmt_ratio(r: dict) -> str:
    return f"**{r['ratio']:.3f}** ({r['ci'][0]:.3f}–{r['ci'][1]:.3f})"


def node_count(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


# -- 1. inference ------------------------------------------------------------------------------

def _python_with(module: str, explicit: str | None) -> str | None:
    """An interpreter that can import ``module``: the one given, or this one."""
    candidates = [explicit] if explicit else [sys.executable]
    for python in candidates:
        if python and subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0:
            return python
    return None


def export_real(work: Path, torch_python: str | None, tf_python: str | None) -> dict[str, Path]:
    """ResNeXt-50 32x4d written by the real exporters (samples/exporters/), when their
    frameworks are installed: PyTorch's torch.chunk form and its groups=32 twin, and tf2onnx's
    conversion of a legacy Lambda-style Keras model."""
    found = {}
    python = _python_with("torch", torch_python)
    if python:
        out = work / "torch"
        subprocess.run([python, str(REPO / "samples/exporters/export_torch.py"), "--no-fixtures", "--resnext",
                        "--resnext-out", str(out)], check=True, capture_output=True)
        found["torch groups=32"] = out / "resnext50_32x4d_grouped.onnx"
        found["torch chunk"] = out / "resnext50_32x4d_chunk.onnx"
    python = _python_with("tf2onnx", tf_python)
    if python:
        out = work / "tf2onnx"
        subprocess.run([python, str(REPO / "samples/exporters/export_tf2onnx.py"), "--no-fixtures", "--resnext",
                        str(out)], check=True, capture_output=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        found["tf2onnx Lambda"] = out / "resnext50_lambda_tf2onnx.onnx"
    return found


def bench_onnx_inference(work: Path, quick: bool, real: dict[str, Path] | None = None) -> dict:
    image = 64 if quick else 224
    rounds = 5 if quick else 30
    paths, rows = {}, []
    native = work / "resnext_native.onnx"
    onnx.save(resnext50("native", image=image), native)
    paths["native"] = native
    for form in ("split", "slice"):
        src = work / f"resnext_{form}.onnx"
        onnx.save(resnext50(form, image=image), src)
        out = work / f"resnext_{form}.fused.onnx"
        result = gconv_rewrite.fuse(src, output=out, force=True, verify=False)
        assert len(result.report.rewrites) == 16, result.report.skipped
        paths[form], paths[f"{form} → fused"] = src, out
    feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, image, image)).astype(np.float32)}
    latency = interleaved_latency(paths, feeds, rounds)
    real_rows = {}
    if real and not quick:  # the exporters write 224x224 models with input "x"
        real_paths = {}
        for name, src in real.items():
            real_paths[name] = src
            if name != "torch groups=32":
                out = work / f"{src.stem}.fused.onnx"
                result = gconv_rewrite.fuse(src, output=out, force=True, verify=False)
                real_rows[name] = len(result.report.rewrites)
                real_paths[f"{name} → fused"] = out
        x = {name: {onnx.load(str(path), load_external_data=False).graph.input[0].name:
                    np.random.default_rng(0).standard_normal([1, 224, 224, 3] if name.startswith("tf2onnx")
                                                             else [1, 3, 224, 224]).astype(np.float32)}
             for name, path in real_paths.items()}
        real_latency = interleaved_latency_feeds(real_paths, x, rounds)
        latency.update(real_latency)
        paths.update(real_paths)
    creation = {}
    for name, p in paths.items():
        samples = []
        for _ in range(2 if quick else 3):
            start = time.perf_counter()
            session(p)
            samples.append(time.perf_counter() - start)
        creation[name] = summary(samples)
    for name, p in paths.items():
        rows.append({"model": name, "latency": latency[name], "session_creation": creation[name],
                     "nodes": node_count(p)})
    wanted = [("torch chunk→fused / torch groups=32", "torch chunk → fused", "torch groups=32"),
              ("torch chunk / torch chunk→fused", "torch chunk", "torch chunk → fused"),
              ("tf2onnx / tf2onnx→fused", "tf2onnx Lambda", "tf2onnx Lambda → fused"),
              ("split→fused / native", "split → fused", "native"), ("slice→fused / native", "slice → fused", "native"),
              ("split / split→fused", "split", "split → fused"), ("slice / slice→fused", "slice", "slice → fused")]
    ratios = {label: ratio(latency, a, b) for label, a, b in wanted if a in latency and b in latency}
    return {"input": [1, 3, image, image], "rounds": latency["native"]["n"], "sessions": SESSIONS, "rows": rows, "ratios": ratios}


# -- 3. rewrite cost ---------------------------------------------------------------------------

_BARE = "import sys, onnx_ir as ir; ir.save(ir.load(sys.argv[1]), sys.argv[2])"
_BARE_EXTERNAL = ("import sys, os, onnx_ir as ir; "
                  "ir.save(ir.load(sys.argv[1]), sys.argv[2], external_data=os.path.basename(sys.argv[2]) + '.data')")
_FUSE = ("import sys, gconv_rewrite; gconv_rewrite.fuse(sys.argv[1], output=sys.argv[2], force=True, verify=False)")
_SLIM = "import sys, onnxslim; onnxslim.slim(sys.argv[1], sys.argv[2])"
_SIM = ("import sys, onnx, onnxsim; m, ok = onnxsim.simplify(onnx.load(sys.argv[1])); onnx.save(m, sys.argv[2])")


# The child reports its own high-water mark: ru_maxrss of a forked child counts the parent's pages.
_PEAK = "; print('VmHWM', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"


def measure_process(code: str, *args: str) -> dict:
    """Wall time and peak RSS of a fresh interpreter running ``code`` (imports included)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code + _PEAK, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - start
    ok = proc.returncode == 0
    peak_kb = next((int(l.split()[1].strip("[]'")) for l in proc.stdout.splitlines() if l.startswith("VmHWM")), 0)
    return {"wall_s": wall, "peak_rss_mb": peak_kb / 1024, "ok": ok, **({} if ok else {"error": proc.stderr[-300:]})}


def bench_rewrite_cost(work: Path, quick: bool) -> dict:
    src = work / "cost_split.onnx"
    onnx.save(resnext50("split", image=64), src)
    size_mb = src.stat().st_size / 1e6
    repeats = 1 if quick else 3
    tools = {"onnx_ir load+save": _BARE, "gconv-rewrite --fuse --no-verify": _FUSE}
    if not quick:
        tools.update({"onnxslim": _SLIM, "onnxsim": _SIM})
    results = {}
    for name, code in tools.items():
        runs = []
        for i in range(repeats):
            runs.append(measure_process(code, str(src), str(work / f"cost_out_{i}.onnx")))
        ok = all(r["ok"] for r in runs)
        results[name] = {"wall": summary([r["wall_s"] for r in runs]),
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "ok": ok}
        if not ok:
            results[name]["error"] = runs[0].get("error", "")
    bare = results["onnx_ir load+save"]["wall"]["median"]
    ratios = {name: r["wall"]["median"] / bare for name, r in results.items()}
    # The same in-process, without interpreter start and imports: the work itself.
    phases = gconv_rewrite.fuse(src, output=work / "cost_inproc.onnx", force=True, verify=False).report.timings
    return {"model_mb": size_mb, "tools": results, "ratio_to_bare": ratios, "fuse_phases_s": phases}


# -- 4. scale ----------------------------------------------------------------------------------

def chain_model(blocks: int) -> onnx.ModelProto:
    """``blocks`` tiny Split(2) → 2 Conv → Concat → Relu blocks in a chain: 5 nodes each."""
    b = GraphBuilder(opset=17)
    x = "x"
    for _ in range(blocks):
        x = b.grouped_conv(x, 4, 4, 2, form="split", kernel=(1, 1))
        x = b.node("Relu", [x])[0]
    b.nodes.append(onnx.helper.make_node("Identity", [x], ["y"]))
    return b.model([("x", [1, 4, 1, 1])], [("y", [1, 4, 1, 1])], name=f"chain{blocks}")


def bench_scale(work: Path, quick: bool) -> dict:
    sizes = [1_000, 10_000] if quick else [1_000, 10_000, 100_000]
    rows = []
    for nodes in sizes:
        src = work / f"chain_{nodes}.onnx"
        onnx.save(chain_model(nodes // 5), src)
        result = gconv_rewrite.fuse(src, output=work / f"chain_{nodes}.fused.onnx", force=True, verify=False)
        t = result.report.timings
        total = t["load"] + t["rewrite"] + t["save"]
        rows.append({"nodes": nodes, "rewrites": len(result.report.rewrites), "seconds": t,
                     "per_node_us": total / nodes * 1e6, "rewrite_per_node_us": t["rewrite"] / nodes * 1e6})
    return {"rows": rows}


def large_model(path: Path, blocks: int = 17, channels: int = 4096, groups: int = 4) -> int:
    """A chain of Split(4) → 4 Conv 3×3 → Concat blocks whose weights (2.5 GB with the defaults,
    over protobuf's 2 GB limit) are streamed to one external data file. Returns their bytes."""
    from onnx import external_data_helper, helper, numpy_helper

    width = channels // groups
    rng = np.random.default_rng(0)
    data_name = path.name + ".data"
    nodes, initializers, offset = [], [], 0
    x = "x"
    with open(path.parent / data_name, "wb") as data:
        for block in range(blocks):
            parts = [f"b{block}_part{i}" for i in range(groups)]
            sizes = numpy_helper.from_array(np.full(groups, width, np.int64), f"b{block}_sizes")
            initializers.append(sizes)
            nodes.append(helper.make_node("Split", [x, sizes.name], parts, axis=1, name=f"b{block}_split"))
            outs = []
            for i, part in enumerate(parts):
                weight = (rng.random((width, width, 3, 3), dtype=np.float32) - 0.5) * (1 / (3 * width ** 0.5))
                tensor = numpy_helper.from_array(weight, f"b{block}_w{i}")
                raw = tensor.raw_data
                external_data_helper.set_external_data(tensor, data_name, offset=offset, length=len(raw))
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                data.write(raw)
                offset += len(raw)
                initializers.append(tensor)
                outs.append(f"b{block}_conv{i}")
                nodes.append(helper.make_node("Conv", [part, tensor.name], [outs[-1]], pads=[1, 1, 1, 1],
                                              name=f"b{block}_conv{i}"))
            x = f"b{block}_out"
            nodes.append(helper.make_node("Concat", outs, [x], axis=1, name=f"b{block}_concat"))
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                             [1, channels, 1, 1])],
                              [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [1, channels, 1, 1])],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return offset


def bench_large_model(work: Path, quick: bool) -> dict:
    """Peak RSS of fusing a model whose external weights exceed protobuf's 2 GB limit."""
    blocks = 1 if quick else 17
    src = work / "large.onnx"
    weights = large_model(src, blocks=blocks)
    bare = measure_process(_BARE_EXTERNAL, str(src), str(work / "large_bare.onnx"))
    (work / "large_bare.onnx.data").unlink(missing_ok=True)
    fuse = measure_process(_FUSE, str(src), str(work / "large_fused.onnx"))
    for leftover in ("large.onnx.data", "large_fused.onnx.data"):
        (work / leftover).unlink(missing_ok=True)
    return {"weights_gb": weights / 1e9, "bare_load_save": bare, "fuse_no_verify": fuse,
            "fuse_rss_over_weights": fuse["peak_rss_mb"] * 2**20 / weights}


# -- 5. verification cost ----------------------------------------------------------------------

def bench_verification(work: Path, quick: bool) -> dict:
    image = 64 if quick else 224
    src = work / "verify_split.onnx"
    onnx.save(resnext50("split", image=image), src)
    result = gconv_rewrite.fuse(src, output=work / "verify_fused.onnx", force=True)
    feeds = {"input": np.zeros((1, 3, image, image), np.float32)}
    s = session(src, optimized=False)
    s.run(None, feeds)
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        s.run(None, feeds)
        samples.append(time.perf_counter() - start)
    one = statistics.median(samples)
    return {"verify_s": result.report.timings["verify"], "one_inference_s": one,
            "verify_over_inference": result.report.timings["verify"] / one}


def bench_tensorflow(work: Path, quick: bool, tf_python: str | None = None) -> dict:
    """The TF paths, each in its own interpreter (oneDNN must be set before TF is imported):
    benchmarks/tf_expand.py (grouped vs expanded SavedModel, oneDNN off and on) and
    benchmarks/keras_resnext.py (a legacy Lambda ResNeXt before/after conversion)."""
    if quick:
        return {"skipped": "--quick (TF start-up alone takes most of a minute); the test suite covers these paths"}
    python = _python_with("tensorflow", tf_python)
    if python is None:
        return {"skipped": "no interpreter with tensorflow (pass --tf-python)"}
    runs = {"tf_expand": [str(REPO / "benchmarks/tf_expand.py")] + (["--quick"] if quick else []),
            "keras_resnext": [str(REPO / "benchmarks/keras_resnext.py")] + (["--size", "64", "--runs", "3"]
                                                                             if quick else [])}
    results = {}
    for name, command in runs.items():
        proc = subprocess.run([python, *command], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)})
        results[name] = {"ok": proc.returncode == 0, "output": proc.stdout.strip()[-4000:],
                         **({} if proc.returncode == 0 else {"error": proc.stderr.strip()[-600:]})}
    return results


SECTIONS = {"onnx_inference": bench_onnx_inference, "rewrite_cost": bench_rewrite_cost,
            "scale": bench_scale, "large_model": bench_large_model, "verification": bench_verification,
            "tensorflow": bench_tensorflow}


def markdown(results: dict) -> str:
    out = [f"Machine: {results['machine']}; quick={results['quick']}; {results['date']}", ""]
    if "onnx_inference" in results:
        r = results["onnx_inference"]
        out += [f"**ONNX inference** (onnxruntime CPU, 2 threads, input {'x'.join(map(str, r['input']))}, "
                f"{r.get('sessions', 1)} fresh sessions per model, {r['rounds']} interleaved rounds in all; "
                "median ± IQR/2; ratios: geometric mean over the session sets (95% t interval))", "",
                "| model | latency | session creation | nodes |", "|---|---|---|---|"]
        out += [f"| {row['model']} | {fmt_ms(row['latency'])} | {fmt_ms(row['session_creation'])} | {row['nodes']} |"
                for row in r["rows"]]
        out += ["", " · ".join(f"{k}: {fmt_ratio(v)}" for k, v in r["ratios"].items()), ""]
    if "rewrite_cost" in results:
        r = results["rewrite_cost"]
        out += [f"**Rewrite cost** (fresh process each, imports included; ResNeXt-50 Split form, "
                f"{r['model_mb']:.0f} MB)", "", "| tool | wall | peak RSS | × bare load+save |", "|---|---|---|---|"]
        out += [f"| {name} | {t['wall']['median']:.2f} s | {t['peak_rss_mb']:.0f} MB | "
                f"{r['ratio_to_bare'][name]:.2f}{'' if t['ok'] else ' (failed)'} |" for name, t in r["tools"].items()]
        out += ["", "in-process phases: " + ", ".join(f"{k} {v:.3f} s" for k, v in r["fuse_phases_s"].items()), ""]
    if "scale" in results:
        out += ["**Scale** (chains of Split(2) → 2 Conv → Concat → Relu, `--no-verify`)", "",
                "| nodes | rewrites | load+rewrite+save | per node | rewrite per node |", "|---|---|---|---|---|"]
        for row in results["scale"]["rows"]:
            t = row["seconds"]
            out.append(f"| {row['nodes']:,} | {row['rewrites']:,} | {t['load'] + t['rewrite'] + t['save']:.2f} s | "
                       f"{row['per_node_us']:.1f} µs | {row['rewrite_per_node_us']:.1f} µs |")
        out.append("")
    if "large_model" in results:
        r = results["large_model"]
        out += [f"**Large model** ({r['weights_gb']:.2f} GB of external weights, `--no-verify`): fuse peak RSS "
                f"{r['fuse_no_verify']['peak_rss_mb']:.0f} MB = **{r['fuse_rss_over_weights']:.2f} × the weights** "
                f"in {r['fuse_no_verify']['wall_s']:.1f} s; bare onnx_ir load+save: "
                f"{r['bare_load_save']['peak_rss_mb']:.0f} MB in {r['bare_load_save']['wall_s']:.1f} s", ""]
    if "tensorflow" in results:
        r = results["tensorflow"]
        out += ["**TensorFlow / Keras**", ""]
        if "skipped" in r:
            out += [f"skipped: {r['skipped']}", ""]
        for name, run in r.items():
            if isinstance(run, dict):
                out += [f"`benchmarks/{name}.py`" + ("" if run["ok"] else " FAILED: " + run.get("error", "")), "",
                        "```", run["output"], "```", ""]
    if "verification" in results:
        r = results["verification"]
        out += [f"**Verification cost**: {r['verify_s']:.2f} s = {r['verify_over_inference']:.1f} × one "
                f"unoptimised inference of the Split-form model ({r['one_inference_s'] * 1e3:.0f} ms)", ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small inputs, few rounds (< 1 min)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "latest.json")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run only these sections")
    parser.add_argument("--torch-python", default=os.environ.get("GCONV_TORCH_PYTHON"),
                        help="an interpreter with torch==2.13.0, to export the PyTorch ResNeXt (default: this one)")
    parser.add_argument("--tf-python", default=os.environ.get("GCONV_TF_PYTHON"),
                        help="an interpreter with tensorflow + tf2onnx, for the tf2onnx ResNeXt (default: this one)")
    args = parser.parse_args()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                          f"onnxruntime {ort.__version__}",
               "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="gconv-bench-") as tmp:
        for name, bench in SECTIONS.items():
            if args.only and name not in args.only:
                continue
            start = time.perf_counter()
            if name == "tensorflow":
                results[name] = bench(Path(tmp), args.quick, args.tf_python)
            elif name == "onnx_inference" and not args.quick:
                real = export_real(Path(tmp), args.torch_python, args.tf_python)
                results[name] = bench(Path(tmp), args.quick, real)
            else:
                results[name] = bench(Path(tmp), args.quick)
            results[name]["section_seconds"] = time.perf_counter() - start
            print(f"[{name}: {results[name]['section_seconds']:.1f} s]", file=sys.stderr)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    # Timings are never asserted, but a tool that failed to run is a failed smoke run (CI sees it).
    failed = [name for name, tool in results.get("rewrite_cost", {}).get("tools", {}).items()
              if not tool["ok"] and name.startswith("gconv-rewrite")]
    if failed:
        sys.exit(f"benchmarks: {', '.join(failed)} failed: {results['rewrite_cost']['tools'][failed[0]].get('error', '')}")


if __name__ == "__main__":
    main()
