"""gconv-rewrite benchmarks: inference speed, rewrite cost, scale, verification cost.

    python benchmarks/run.py [--quick] [--json results.json] [--only SECTION ...]

Every figure that matters is a ratio taken side by side in one run (this machine is shared and
noisy: absolute times drift, ratios much less). Latencies are measured interleaved — one run of
each variant per round — so that drift hits every variant alike. Prints a Markdown table and
writes JSON (default benchmarks/results/latest.json).
"""

from __future__ import annotations

import argparse
import json
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

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import rewriter  # noqa: E402
from samples.models import GraphBuilder, resnext50  # noqa: E402


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
    sessions = {name: session(p) for name, p in paths.items()}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feeds)
    times = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    return {name: summary(t) for name, t in times.items()}


def node_count(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


# -- 1. inference ------------------------------------------------------------------------------

def bench_onnx_inference(work: Path, quick: bool) -> dict:
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
        result = rewriter.fuse(src, output=out, force=True, verify=False)
        assert len(result.report.rewrites) == 16, result.report.skipped
        paths[form], paths[f"{form} → fused"] = src, out
    feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, image, image)).astype(np.float32)}
    latency = interleaved_latency(paths, feeds, rounds)
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
    ratios = {
        "split→fused / native": latency["split → fused"]["median"] / latency["native"]["median"],
        "slice→fused / native": latency["slice → fused"]["median"] / latency["native"]["median"],
        "split / split→fused": latency["split"]["median"] / latency["split → fused"]["median"],
        "slice / slice→fused": latency["slice"]["median"] / latency["slice → fused"]["median"],
    }
    return {"input": [1, 3, image, image], "rounds": rounds, "rows": rows, "ratios": ratios}


# -- 3. rewrite cost ---------------------------------------------------------------------------

_BARE = "import sys, onnx_ir as ir; ir.save(ir.load(sys.argv[1]), sys.argv[2])"
_FUSE = ("import sys, rewriter; rewriter.fuse(sys.argv[1], output=sys.argv[2], force=True, verify=False)")
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
    phases = rewriter.fuse(src, output=work / "cost_inproc.onnx", force=True, verify=False).report.timings
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
        result = rewriter.fuse(src, output=work / f"chain_{nodes}.fused.onnx", force=True, verify=False)
        t = result.report.timings
        total = t["load"] + t["rewrite"] + t["save"]
        rows.append({"nodes": nodes, "rewrites": len(result.report.rewrites), "seconds": t,
                     "per_node_us": total / nodes * 1e6, "rewrite_per_node_us": t["rewrite"] / nodes * 1e6})
    return {"rows": rows}


# -- 5. verification cost ----------------------------------------------------------------------

def bench_verification(work: Path, quick: bool) -> dict:
    image = 64 if quick else 224
    src = work / "verify_split.onnx"
    onnx.save(resnext50("split", image=image), src)
    result = rewriter.fuse(src, output=work / "verify_fused.onnx", force=True)
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


SECTIONS = {"onnx_inference": bench_onnx_inference, "rewrite_cost": bench_rewrite_cost,
            "scale": bench_scale, "verification": bench_verification}


def markdown(results: dict) -> str:
    out = [f"Machine: {results['machine']}; quick={results['quick']}; {results['date']}", ""]
    if "onnx_inference" in results:
        r = results["onnx_inference"]
        out += [f"**ONNX inference** (onnxruntime CPU, 2 threads, input {'x'.join(map(str, r['input']))}, "
                f"{r['rounds']} interleaved rounds; median ± IQR/2)", "",
                "| model | latency | session creation | nodes |", "|---|---|---|---|"]
        out += [f"| {row['model']} | {fmt_ms(row['latency'])} | {fmt_ms(row['session_creation'])} | {row['nodes']} |"
                for row in r["rows"]]
        out += ["", " · ".join(f"{k}: **{v:.3f}**" for k, v in r["ratios"].items()), ""]
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
    args = parser.parse_args()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                          f"onnxruntime {ort.__version__}",
               "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="gconv-bench-") as tmp:
        for name, bench in SECTIONS.items():
            if args.only and name not in args.only:
                continue
            start = time.perf_counter()
            results[name] = bench(Path(tmp), args.quick)
            results[name]["section_seconds"] = time.perf_counter() - start
            print(f"[{name}: {results[name]['section_seconds']:.1f} s]", file=sys.stderr)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
