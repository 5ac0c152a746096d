"""--benchmark, --threads and --auto (issue 15): the report keys and their types (timings are never
asserted), the thread count reaching onnxruntime's sessions, --auto's choices on models where the
choice is clear, and its refusals (one line, exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import gconv_rewrite
from gconv_rewrite import auto, benchmark
from gconv_rewrite.auto import MeasuredTarget, Measurement
from gconv_rewrite.targets import NATIVE, SPLIT, ConvProps, Decision
from samples.models import GraphBuilder, grouped_block
from tests.helpers import error_lines, invoke
from tests.helpers import onnx_conv_groups as convs

# Every timing loop short: these tests check what is reported, never how fast.
pytestmark = pytest.mark.usefixtures("short_timings")


def op_types(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def resnext_blocks(form: str = "split", *, blocks: int = 3, groups: int = 8, width: int = 32,
                   channels: int = 64) -> onnx.ModelProto:
    """ResNeXt bottlenecks: 1x1 -> Relu -> grouped 3x3 (in ``form``) -> Relu -> 1x1 -> Add -> Relu."""
    b = GraphBuilder(17, 0)
    x = "x"
    for _ in range(blocks):
        y = b.node("Relu", [b.conv(x, b.weight((width, channels, 1, 1), channels), None, kernel_shape=[1, 1])])[0]
        y = b.grouped_conv(y, width, width, groups, form=form, kernel=(3, 3), pads=[1, 1, 1, 1])
        y = b.node("Relu", [y])[0]
        y = b.conv(y, b.weight((channels, width, 1, 1), width) * 0.5, None, kernel_shape=[1, 1])
        x = b.node("Relu", [b.node("Add", [y, x])[0]])[0]
    b.nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    return b.model([("x", [1, channels, 8, 8])], [("y", [1, channels, 8, 8])], name="resnext_blocks")


def big_grouped(tmp_path: Path, form: str) -> Path:
    """64 groups of 2 channels at 28x28: onnxruntime's grouped kernel beats 64 tiny convs plus a
    Split and a Concat by far (measured here: split/native 1.5-1.6 on 2 shared cores)."""
    path = tmp_path / f"big_{form}.onnx"
    onnx.save(grouped_block(form, groups=64, channels=128, out_channels=128, spatial=(28, 28)), path)
    return path


# -- --benchmark ----------------------------------------------------------------------------------


def test_benchmark_fills_the_report_keys(small_split, tmp_path):
    report = tmp_path / "report.json"
    result = invoke(small_split, "--benchmark", "--threads", "1", "--report", report)
    assert result.exit_code == 0, result.output
    bench = json.loads(report.read_text())["models"][0]["report"]["benchmark"]
    assert {"runtime", "threads", "runs", "before_ms", "after_ms", "ratio"} <= set(bench)
    assert bench["runtime"] == "onnxruntime"
    assert bench["threads"] == 1  # read back from the timed session's options
    assert isinstance(bench["runs"], int) and bench["runs"] >= 3
    for key in ("before_ms", "after_ms", "ratio", "before_spread_ms", "after_spread_ms"):
        assert isinstance(bench[key], float) and bench[key] >= 0, key
    assert bench["before_ms"] > 0 and bench["after_ms"] > 0 and bench["ratio"] > 0
    # One line in the summary.
    lines = [line for line in result.output.splitlines() if line.startswith("benchmark")]
    assert len(lines) == 1 and lines[0].startswith("benchmark (onnxruntime, 1 thread, ")
    assert "before" in lines[0] and "after" in lines[0] and "ratio" in lines[0]


def test_benchmark_in_the_json_document_and_the_api(small_split, tmp_path):
    result = invoke(small_split, "--benchmark", "--format", "json", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output
    bench = json.loads(result.output)["models"][0]["report"]["benchmark"]
    assert bench["runtime"] == "onnxruntime" and isinstance(bench["after_ms"], float)
    # The API, without an output file: the rewritten model is timed from a scratch copy.
    report = gconv_rewrite.fuse(small_split, benchmark=True, threads=2).report
    assert report.benchmark["threads"] == 2 and isinstance(report.benchmark["ratio"], float)
    assert "benchmark" in report.timings


def test_threads_reach_every_timed_session(small_split, monkeypatch):
    created = []
    real = ort.InferenceSession

    def spy(path, sess_options=None, *args, **kwargs):
        # Verification runs with graph optimisations off; timing runs as deployed (on).
        timing = sess_options.graph_optimization_level != ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        created.append((Path(path).name, sess_options.intra_op_num_threads, timing))
        return real(path, sess_options, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    result = invoke(small_split, "--auto", "--benchmark", "--threads", "3", "--force")
    assert result.exit_code == 0, result.output
    timed = [(name, threads) for name, threads, timing in created if timing]
    # Both one-layer models measured by --auto; the original and the written model by --benchmark.
    names = [name for name, _ in timed]
    assert any(n.endswith(".native.onnx") for n in names) and any(n.endswith(".split.onnx") for n in names)
    assert "small.onnx" in names and "small.auto.onnx" in names
    assert {threads for _, threads in timed} == {3}
    assert ("benchmark (onnxruntime, 3 threads" in result.output)


def test_benchmark_with_check_is_a_usage_error(small_split):
    result = invoke(small_split, "--benchmark", "--check")
    assert result.exit_code == 2
    assert "--benchmark times the written model" in result.output


def test_benchmark_table_has_a_runtime_per_output_format():
    assert {"onnx", "savedmodel", "keras"} <= set(benchmark.RUNTIMES)
    assert benchmark.RUNTIMES["onnx"].name == "onnxruntime"
    assert benchmark.output_format("keras", None) == "keras" and benchmark.output_format("keras", "onnx") == "onnx"


# -- --auto: choices ------------------------------------------------------------------------------


def test_auto_keeps_a_big_grouped_conv_native(tmp_path):
    path = big_grouped(tmp_path, "native")
    report = tmp_path / "r.json"
    result = invoke(path, "--auto", "--threads", "2", "--report", report)
    assert result.exit_code == 0, result.output
    assert convs(path.with_name("big_native.auto.onnx")) == [64]
    data = json.loads(report.read_text())["models"][0]["report"]
    assert data["rewrites"] == []
    (node,) = data["target"]["nodes"]
    assert data["target"]["name"] == "auto"
    assert node["form"] == "native" and node["action"] == "keep" and node["verdict"] in ("native", "tie")
    assert isinstance(node["native_ms"], float) and isinstance(node["split_ms"], float)
    (layer,) = node["measurements"]
    assert layer["input_shape"] == [1, 128, 28, 28]
    assert layer["batches"] >= auto.MIN_BATCHES and len(layer["ci95"]) == 2
    assert "measured on onnxruntime CPU, 2 threads" in node["rule"]


def test_auto_fuses_the_same_conv_made_by_hand(tmp_path):
    path = big_grouped(tmp_path, "split")
    report = tmp_path / "r.json"
    result = invoke(path, "--auto", "--report", report)
    assert result.exit_code == 0, result.output
    out = path.with_name("big_split.auto.onnx")
    assert convs(out) == [64] and "Split" not in op_types(out)
    data = json.loads(report.read_text())["models"][0]["report"]
    (node,) = data["target"]["nodes"]
    assert node["action"] == "fuse" and node["verdict"] in ("native", "tie")
    assert data["verification"]["passed"] is True


def test_auto_keeps_every_group_of_a_split_resnext_fused(tmp_path):
    path = tmp_path / "resnext.onnx"
    onnx.save(resnext_blocks("split"), path)
    report = tmp_path / "r.json"
    result = invoke(path, "--auto", "--report", report)
    assert result.exit_code == 0, result.output
    out = path.with_name("resnext.auto.onnx")
    assert sorted(convs(out)) == [1] * 6 + [8] * 3
    assert not {"Split", "Concat"} & set(op_types(out))
    data = json.loads(report.read_text())["models"][0]["report"]
    assert [n["action"] for n in data["target"]["nodes"]] == ["fuse"] * 3
    # The three blocks have the same shapes: measured once, reported for each.
    layers = [n["measurements"][0] for n in data["target"]["nodes"]]
    assert not layers[0].get("same_as") and layers[1]["same_as"] == layers[2]["same_as"] != ""
    assert data["verification"]["passed"] is True


def _fixed(verdict: str):
    """A stand-in for the timing of one pair, so the apply path is tested without timing."""
    native, split = (1.0, 0.5) if verdict == SPLIT else (1.0, 1.0) if verdict == "tie" else (0.5, 1.0)

    def measure_pair(native_path, split_path, shape, dtype, options):
        return {"native_ms": native, "split_ms": split, "ratio": split / native, "ci95": (split / native * 0.9,
                split / native * 1.1), "batches": 6, "runs": 60, "verdict": verdict,
                "note": "within 2% of each other" if verdict == "tie" else ""}

    return measure_pair


@pytest.mark.parametrize("form", ["native", "split"])
def test_auto_applies_a_split_verdict_both_ways(tmp_path, monkeypatch, form):
    monkeypatch.setattr(auto, "_measure_pair", _fixed(SPLIT))
    path = tmp_path / f"m_{form}.onnx"
    onnx.save(grouped_block(form, groups=4, channels=16, out_channels=16), path)
    report = tmp_path / "r.json"
    result = invoke(path, "--auto", "--report", report)
    assert result.exit_code == 0, result.output
    out = path.with_name(f"m_{form}.auto.onnx")
    assert convs(out) == [1, 1, 1, 1] and "Split" in op_types(out)
    data = json.loads(report.read_text())["models"][0]["report"]
    (node,) = data["target"]["nodes"]
    assert node["form"] == "split" and node["verdict"] == "split"
    assert node["action"] == ("expand" if form == "native" else "keep")
    assert "split is faster" in node["rule"] and node["native_ms"] == 1.0 and node["split_ms"] == 0.5
    if form == "native":
        assert data["verification"]["passed"] is True


def test_auto_keeps_the_native_form_on_a_tie(tmp_path, monkeypatch):
    monkeypatch.setattr(auto, "_measure_pair", _fixed("tie"))
    path = tmp_path / "m.onnx"
    onnx.save(grouped_block("split", groups=4, channels=16, out_channels=16), path)
    result = invoke(path, "--auto")
    assert result.exit_code == 0, result.output
    assert convs(path.with_name("m.auto.onnx")) == [4]
    assert "a tie (within 2% of each other), the native form is kept" in result.output


def test_auto_through_the_api(tmp_path, monkeypatch):
    monkeypatch.setattr(auto, "_measure_pair", _fixed(NATIVE))
    path = tmp_path / "m.onnx"
    onnx.save(grouped_block("split", groups=4, channels=16, out_channels=16), path)
    result = gconv_rewrite.rewrite(path, options=gconv_rewrite.Options(auto=True))
    assert result.report.target["name"] == "auto"
    assert [n["action"] for n in result.report.target["nodes"]] == ["fuse"]
    assert "measure" in result.report.timings


def test_measured_target_answers_in_order_and_groups_a_candidates_layers():
    a = ConvProps(groups=8, in_channels=32, out_channels=32)
    b = ConvProps(groups=4, in_channels=16, out_channels=16)
    timed = dict(native_ms=1.0, split_ms=2.0, ratio=2.0, ci95=(1.9, 2.1), batches=6, runs=60)
    measurements = [Measurement("fuse", "f0", a, candidate=0, verdict=NATIVE, **timed),
                    Measurement("fuse", "f1", b, candidate=0, verdict=NATIVE, **timed),
                    Measurement("expand", "e0", a, verdict=SPLIT, **timed)]
    target = MeasuredTarget(measurements, "onnxruntime CPU, 2 threads", 2)
    assert target.decide(a)[0] == NATIVE and target.decide(b)[0] == NATIVE
    nodes = [Decision(location="f0", graph="", form=NATIVE, action="fuse", rule="")]
    target.annotate(nodes)
    assert [m["location"] for m in nodes[0].measurements] == ["f0", "f1"] and nodes[0].native_ms == 2.0
    form, rule = target.decide(a)  # the next measurement of equal properties: the native conv's
    assert form == SPLIT and "split is faster" in rule
    # A conv nobody measured keeps its native form, and says so.
    form, rule = target.decide(ConvProps(groups=2, in_channels=4, out_channels=4))
    assert form == NATIVE and rule.startswith("not measured")


# -- --auto: refusals -----------------------------------------------------------------------------


def test_auto_without_verification_is_one_line_exit_2(small_split):
    result = invoke(small_split, "--auto", "--no-verify")
    assert result.exit_code == 2
    lines = error_lines(result, prefix="")
    assert len(lines) == 1 and lines[0].startswith("gconv-rewrite: error: --auto needs verification")
    with pytest.raises(gconv_rewrite.RewriteError, match="--auto needs verification"):
        gconv_rewrite.rewrite(small_split, options=gconv_rewrite.Options(auto=True, verify=False))


def test_auto_with_target_is_a_usage_error(small_split):
    result = invoke(small_split, "--auto", "--target", "tflite")
    assert result.exit_code == 2
    assert "give --auto or --target, not both" in result.output
    result = invoke(small_split, "--auto", "--expand")
    assert result.exit_code == 2 and "drop --fuse / --expand" in result.output


def test_auto_when_inputs_cannot_be_made_is_one_line_exit_2(tmp_path):
    b = GraphBuilder(17, 0)
    y = b.grouped_conv("x", 16, 16, 4, form="split", kernel=(3, 3), pads=[1, 1, 1, 1])
    b.nodes.append(helper.make_node("Identity", [y], ["y"], name="output"))
    model = b.model([("x", [1, 16, "height", "width"])], [("y", [1, 16, None, None])])
    path = tmp_path / "dynamic.onnx"
    onnx.save(model, path)
    result = invoke(path, "--auto")
    assert result.exit_code == 2
    lines = error_lines(result, prefix="")
    assert len(lines) == 1 and "--shape x=" in lines[0]
    assert not path.with_name("dynamic.auto.onnx").exists()


def test_auto_refuses_keras_and_savedmodel_inputs_in_one_line(tmp_path):
    keras_file = tmp_path / "m.keras"
    keras_file.write_bytes(b"not read")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"not read")
    for path in (keras_file, saved):
        result = invoke(path, "--auto")
        assert result.exit_code == 2
        lines = error_lines(result, prefix="")
        assert len(lines) == 1 and "--auto measures on onnxruntime and works on ONNX models only" in lines[0]


def test_a_model_that_cannot_be_timed_is_reported_and_stays_written(small_split, monkeypatch):
    def refuse(path, threads, options):
        raise RuntimeError("no kernel for this op on this provider")

    monkeypatch.setitem(benchmark.RUNTIMES, "onnx", benchmark.Runtime("onnxruntime", refuse))
    result = invoke(small_split, "--benchmark")
    assert result.exit_code == 0, result.output
    assert small_split.with_name("small.fused.onnx").exists()
    (line,) = [line for line in result.output.splitlines() if line.startswith("benchmark")]
    assert "not timed" in line and "no kernel for this op" in line


def test_benchmark_times_a_keras_model_in_keras(tmp_path):
    import keras  # noqa: F401  (the test extra installs it; a missing one must fail)
    import tensorflow  # noqa: F401  (the test extra installs it; a missing one must fail)

    from samples.keras_models import getitem_model

    path = getitem_model(tmp_path / "g.keras")
    report = tmp_path / "r.json"
    result = invoke(path, "--benchmark", "--threads", "1", "--report", report)
    assert result.exit_code == 0, result.output
    bench = json.loads(report.read_text())["models"][0]["report"]["benchmark"]
    assert bench["runtime"] == "keras" and isinstance(bench["before_ms"], float) and isinstance(bench["ratio"], float)
    # TensorFlow's threads are fixed once it ran in this process: what is in force is reported.
    assert bench["threads"] is None or isinstance(bench["threads"], int)


@pytest.mark.parametrize("verdict", [NATIVE, SPLIT])
def test_auto_measures_every_grouped_layer_of_a_chain(tmp_path, monkeypatch, verdict):
    """ResNeXt fig. 3 of depth three: a wide 1x1 (not grouped, not asked) then two grouped
    layers; the candidate fuses only if both are native here, and its entry lists both."""
    from test_fuse_chains import branches, conv, per_channel, unary

    monkeypatch.setattr(auto, "_measure_pair", _fixed(verdict))
    step = [conv(4, 1, pads=[0] * 4), unary("Relu"), conv(4, 3), unary("Relu"), conv(6, 1, pads=[0] * 4),
            per_channel("Add", "C11")]
    path = tmp_path / "chain.onnx"
    onnx.save(branches(step, reader="shared"), path)
    report = tmp_path / "r.json"
    result = invoke(path, "--auto", "--report", report)
    assert result.exit_code == 0, result.output
    (node,) = json.loads(report.read_text())["models"][0]["report"]["target"]["nodes"]
    assert [m["input_shape"] for m in node["measurements"]] == [[1, 16, 6, 6], [1, 16, 6, 6]]
    if verdict == NATIVE:
        assert node["action"] == "fuse" and sorted(convs(path.with_name("chain.auto.onnx"))) == [1, 4, 4]
    else:
        assert node["action"] == "keep" and convs(path.with_name("chain.auto.onnx")).count(1) == 12
