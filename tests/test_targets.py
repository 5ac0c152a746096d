"""Deployment targets (--target, --list-targets): the table's rules, and one run that leaves each
grouped conv in the form the target wants — fusing hand-made groups it runs natively, expanding
native ones it does not — verified like any other rewrite."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from onnx import helper

import gconv_rewrite
from gconv_rewrite import targets
from gconv_rewrite.errors import BadInput
from gconv_rewrite.targets import NATIVE, SPLIT, ConvProps
from samples.models import GraphBuilder, grouped_block
from tests.helpers import invoke, op_counts

REQUIRED = ("onnxruntime-cpu", "openvino-cpu", "tflite", "tflite-builtin", "tflite-gpu", "edgetpu", "tfjs",
            "tf-cpu-no-onednn", "mnn", "armnn")


def form(target: str, **props) -> str:
    chosen, rule = targets.get(target).decide(ConvProps(**props))
    assert chosen in (NATIVE, SPLIT) and rule
    return chosen


def convs(path: Path) -> list[tuple[str, int]]:
    """(name, group) of every Conv in the file."""
    out = []
    for node in onnx.load(str(path)).graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            out.append((node.name, group))
    return out


# -- the table ----------------------------------------------------------------------------------


def test_table_has_every_required_target():
    assert set(REQUIRED) <= set(targets.names())
    for target in targets.TARGETS.values():
        assert target.runtime and target.native_when and target.evidence


@pytest.mark.parametrize("name", REQUIRED)
def test_every_rule_answers_with_a_form_and_a_sentence(name):
    for groups, cin, cout in [(2, 8, 8), (4, 16, 16), (8, 16, 16), (16, 16, 16), (16, 16, 32), (32, 128, 64)]:
        for rank in (1, 2, 3):
            for transposed in (False, True):
                form(name, groups=groups, in_channels=cin, out_channels=cout, kernel_rank=rank,
                     transposed=transposed)


def test_tflite_gpu_needs_multiples_of_four_channels_per_group():
    assert form("tflite-gpu", groups=4, in_channels=16, out_channels=16) == NATIVE  # 4 / 4 per group
    assert form("tflite-gpu", groups=2, in_channels=16, out_channels=16) == NATIVE  # 8 / 8
    assert form("tflite-gpu", groups=8, in_channels=16, out_channels=16) == SPLIT  # 2 / 2
    assert form("tflite-gpu", groups=4, in_channels=16, out_channels=24) == SPLIT  # 4 in, 6 out
    assert form("tflite-gpu", groups=4, in_channels=24, out_channels=16) == SPLIT  # 6 in, 4 out
    chosen, rule = targets.get("tflite-gpu").decide(ConvProps(groups=8, in_channels=16, out_channels=16))
    assert "2 in / 2 out" in rule and "multiples of 4" in rule
    # Depthwise is its own op (DEPTHWISE_CONV_2D); TFLite has no grouped transposed or 3D conv.
    assert form("tflite-gpu", groups=16, in_channels=16, out_channels=16) == NATIVE
    assert form("tflite-gpu", groups=4, in_channels=16, out_channels=16, transposed=True) == SPLIT
    assert form("tflite-gpu", groups=4, in_channels=16, out_channels=16, kernel_rank=3) == SPLIT


@pytest.mark.parametrize("name", ["edgetpu", "tfjs", "tf-cpu-no-onednn", "mnn", "armnn", "tflite-builtin"])
def test_targets_without_grouped_conv_split_all_but_depthwise(name):
    assert form(name, groups=4, in_channels=16, out_channels=16) == SPLIT
    assert form(name, groups=32, in_channels=128, out_channels=128) == SPLIT
    assert form(name, groups=16, in_channels=16, out_channels=16) == NATIVE  # depthwise 2D


def test_mnn_and_armnn_keep_only_groups_equal_in_equal_out():
    # A depthwise conv with a channel multiplier: TFLite/TF.js depthwise ops take it, MNN and ACL do not.
    assert form("mnn", groups=16, in_channels=16, out_channels=32) == SPLIT
    assert form("armnn", groups=16, in_channels=16, out_channels=32) == SPLIT
    assert form("edgetpu", groups=16, in_channels=16, out_channels=32) == NATIVE
    # MNN has DeconvolutionDepthwise; Arm NN's parser takes 2D Conv only.
    assert form("mnn", groups=16, in_channels=16, out_channels=16, transposed=True) == NATIVE
    assert form("armnn", groups=16, in_channels=16, out_channels=16, transposed=True) == SPLIT
    assert form("armnn", groups=16, in_channels=16, out_channels=16, kernel_rank=1) == SPLIT


def test_native_targets_and_tflite_xnnpack():
    for props in [dict(groups=8, in_channels=16, out_channels=16), dict(groups=3, in_channels=9, out_channels=6),
                  dict(groups=4, in_channels=16, out_channels=16, transposed=True, kernel_rank=3)]:
        assert form("onnxruntime-cpu", **props) == NATIVE
        assert form("openvino-cpu", **props) == NATIVE
    assert form("tflite", groups=8, in_channels=16, out_channels=16) == NATIVE
    assert form("tflite", groups=8, in_channels=16, out_channels=16, kernel_rank=1) == NATIVE
    assert form("tflite", groups=8, in_channels=16, out_channels=16, transposed=True) == SPLIT
    assert form("tflite", groups=8, in_channels=16, out_channels=16, kernel_rank=3) == SPLIT
    assert form("tflite-builtin", groups=8, in_channels=16, out_channels=16) == SPLIT


def test_unknown_target_names_the_known_ones():
    with pytest.raises(BadInput) as info:
        targets.get("coreml")
    assert "coreml" in info.value.message and all(name in info.value.message for name in REQUIRED)


# -- models ---------------------------------------------------------------------------------------


def two_grouped_convs(form_: str = "native") -> onnx.ModelProto:
    """conv_a: 16 -> 16, group 4 (4 channels per group); conv_b: 16 -> 16, group 8 (2 per group)."""
    b = GraphBuilder(17, 0)
    y = b.grouped_conv("x", 16, 16, 4, form=form_, kernel=(3, 3), pads=[1, 1, 1, 1])
    b.nodes[-1].name = "conv_a" if form_ == "native" else "concat_a"
    y = b.node("Relu", [y], name="relu_a")[0]
    y = b.grouped_conv(y, 16, 16, 8, form=form_, kernel=(3, 3), pads=[1, 1, 1, 1])
    b.nodes[-1].name = "conv_b" if form_ == "native" else "concat_b"
    b.nodes.append(helper.make_node("Identity", [y], ["y"], name="output"))
    return b.model([("x", [1, 16, 8, 8])], [("y", [1, 16, 8, 8])], name="two_grouped")


def resnext_ish(form_: str = "split", *, blocks: int = 3, groups: int = 8, width: int = 32,
                channels: int = 64) -> onnx.ModelProto:
    """ResNeXt bottleneck blocks: 1x1 -> Relu -> grouped 3x3 (hand-made, in ``form_``) -> Relu
    -> 1x1 -> Add(shortcut) -> Relu."""
    b = GraphBuilder(17, 0)
    x = "x"
    for _ in range(blocks):
        y = b.conv(x, b.weight((width, channels, 1, 1), channels), None, kernel_shape=[1, 1])
        y = b.node("Relu", [y])[0]
        y = b.grouped_conv(y, width, width, groups, form=form_, kernel=(3, 3), pads=[1, 1, 1, 1])
        y = b.node("Relu", [y])[0]
        y = b.conv(y, b.weight((channels, width, 1, 1), width) * 0.5, None, kernel_shape=[1, 1])
        x = b.node("Relu", [b.node("Add", [y, x])[0]])[0]
    b.nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    return b.model([("x", [1, channels, 8, 8])], [("y", [1, channels, 8, 8])], name="resnext_ish")


@pytest.fixture
def two_native(tmp_path) -> Path:
    path = tmp_path / "two.onnx"
    onnx.save(two_grouped_convs("native"), path)
    return path


# -- the CLI --------------------------------------------------------------------------------------


def test_tflite_gpu_expands_exactly_the_conv_without_multiples_of_four(two_native, tmp_path):
    report_path = tmp_path / "report.json"
    result = invoke(two_native, "--target", "tflite-gpu", "--report", report_path)
    assert result.exit_code == 0, result.output
    out = two_native.with_name("two.tflite-gpu.onnx")
    written = convs(out)
    assert ("conv_a", 4) in written  # 4 channels per group: kept native
    assert not any(name == "conv_b" for name, _ in written)
    assert sum(1 for _, group in written if group == 1) == 8  # conv_b: 8 plain convs
    assert op_counts(out)["Split"] == 1 and op_counts(out)["Concat"] == 1

    report = json.loads(report_path.read_text())["models"][0]["report"]
    assert [r["location"] for r in report["rewrites"]] == ["conv_b"]
    assert report["rewrites"][0]["kind"] == "expand-grouped-conv"
    nodes = {n["location"]: n for n in report["target"]["nodes"]}
    assert report["target"]["name"] == "tflite-gpu"
    assert (nodes["conv_a"]["form"], nodes["conv_a"]["action"]) == ("native", "keep")
    assert (nodes["conv_b"]["form"], nodes["conv_b"]["action"]) == ("split", "expand")
    assert "2 in / 2 out" in nodes["conv_b"]["rule"] and "4 in / 4 out" in nodes["conv_a"]["rule"]
    assert report["verification"]["passed"] is True
    # The kept conv is a skip whose reason is the rule; existing keys are unchanged.
    (skip,) = report["skipped"]
    assert skip["location"] == "conv_a" and skip["reason"].startswith("native for tflite-gpu: ")
    assert {"kind", "location", "groups", "channels", "nodes", "graph"} <= set(report["rewrites"][0])
    # The summary gives each node's form and the rule that chose it.
    assert "target tflite-gpu" in result.output
    assert "kept native (1): conv_a" in result.output and "expanded to split (1): conv_b" in result.output


def test_target_run_is_idempotent(two_native):
    assert invoke(two_native, "--target", "tflite-gpu").exit_code == 0
    out = two_native.with_name("two.tflite-gpu.onnx")
    result = invoke(out, "--target", "tflite-gpu", "--check")
    assert result.exit_code == 0, result.output
    assert "check: 0 changes found" in result.output


def test_onnxruntime_cpu_fuses_a_split_resnext_completely(tmp_path):
    path = tmp_path / "resnext.onnx"
    onnx.save(resnext_ish("split"), path)
    report_path = tmp_path / "report.json"
    result = invoke(path, "--target", "onnxruntime-cpu", "--report", report_path)
    assert result.exit_code == 0, result.output
    counts = op_counts(path.with_name("resnext.onnxruntime-cpu.onnx"))
    assert "Split" not in counts and "Concat" not in counts
    written = convs(path.with_name("resnext.onnxruntime-cpu.onnx"))
    assert sorted(group for _, group in written if group > 1) == [8, 8, 8]
    report = json.loads(report_path.read_text())["models"][0]["report"]
    assert len(report["rewrites"]) == 3 and not report["skipped"]
    assert [(n["form"], n["action"]) for n in report["target"]["nodes"]] == [("native", "fuse")] * 3


def test_a_hand_made_group_the_target_wants_split_stays_split(tmp_path):
    # Split form of the two convs: tflite-gpu fuses the 4-per-group one and leaves the 2-per-group one.
    path = tmp_path / "two_split.onnx"
    onnx.save(two_grouped_convs("split"), path)
    report_path = tmp_path / "report.json"
    result = invoke(path, "--target", "tflite-gpu", "--report", report_path)
    assert result.exit_code == 0, result.output
    written = convs(path.with_name("two_split.tflite-gpu.onnx"))
    assert sorted(group for _, group in written) == [1] * 8 + [4]
    report = json.loads(report_path.read_text())["models"][0]["report"]
    nodes = report["target"]["nodes"]
    assert [(n["form"], n["action"]) for n in nodes] == [("native", "fuse"), ("split", "keep")]
    assert nodes[1]["location"] == "concat_b"
    assert any(s["location"] == "concat_b" and s["reason"].startswith("split for tflite-gpu: ")
               for s in report["skipped"])


def test_edgetpu_expands_grouped_and_keeps_depthwise_through_the_api(tmp_path):
    b = GraphBuilder(17, 0)
    y = b.grouped_conv("x", 16, 16, 16, form="native", kernel=(3, 3), pads=[1, 1, 1, 1], name="depthwise")
    y = b.grouped_conv(y, 16, 16, 4, form="native", kernel=(3, 3), pads=[1, 1, 1, 1], name="grouped")
    b.nodes.append(helper.make_node("Identity", [y], ["y"], name="output"))
    path = tmp_path / "dw.onnx"
    onnx.save(b.model([("x", [1, 16, 8, 8])], [("y", [1, 16, 8, 8])]), path)
    result = gconv_rewrite.rewrite(path, options=gconv_rewrite.Options(target="edgetpu"))
    assert [r.location for r in result.report.rewrites] == ["grouped"]
    assert result.report.verification.passed
    actions = {n["location"]: (n["form"], n["action"]) for n in result.report.target["nodes"]}
    assert actions == {"depthwise": ("native", "keep"), "grouped": ("split", "expand")}


def test_dry_run_with_a_target_plans_both_directions(tmp_path):
    # One hand-made group and one native: mnn wants both split -> the native one would expand.
    b = GraphBuilder(17, 0)
    y = b.grouped_conv("x", 16, 16, 4, form="split", kernel=(3, 3), pads=[1, 1, 1, 1])
    y = b.grouped_conv(y, 16, 16, 4, form="native", kernel=(3, 3), pads=[1, 1, 1, 1], name="native")
    b.nodes.append(helper.make_node("Identity", [y], ["y"], name="output"))
    path = tmp_path / "mixed.onnx"
    onnx.save(b.model([("x", [1, 16, 8, 8])], [("y", [1, 16, 8, 8])]), path)
    result = invoke(path, "--target", "mnn", "--dry-run", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["models"][0]["report"]
    assert [(n["form"], n["action"]) for n in report["target"]["nodes"]] == [("split", "keep"), ("split", "expand")]
    assert not path.with_name("mixed.mnn.onnx").exists()


def test_list_targets_needs_no_model():
    result = invoke("--list-targets")
    assert result.exit_code == 0, result.output
    for name in REQUIRED:
        assert name in result.output
    assert "docs/TARGETS.md" in result.output


def test_unknown_target_is_one_line_exit_2(two_native):
    result = invoke(two_native, "--target", "coreml")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gconv-rewrite: error: unknown target 'coreml'")
    assert all(name in lines[0] for name in REQUIRED)
    assert not two_native.with_name("two.coreml.onnx").exists()


@pytest.mark.parametrize("kind", ["keras", "savedmodel"])
def test_target_with_to_onnx_refuses_tensorflow_inputs_in_one_line(tmp_path, kind):
    if kind == "keras":
        path = tmp_path / "model.keras"
        path.write_bytes(b"not read: refused before loading")
    else:
        path = tmp_path / "saved"
        path.mkdir()
        (path / "saved_model.pb").write_bytes(b"")
    result = invoke(path, "--target", "tflite", "--to", "onnx")  # SavedModel/Keras --target: test_targets_tf_keras
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--target with --to onnx is not supported" in lines[0]


def test_target_with_fuse_or_expand_is_a_usage_error(two_native):
    result = invoke(two_native, "--target", "tflite", "--expand")
    assert result.exit_code == 2
    assert "--target chooses fuse or expand per node" in result.output


def test_target_on_a_model_without_grouped_convs(tmp_path):
    path = tmp_path / "plain.onnx"
    onnx.save(grouped_block("native", groups=1, channels=8, out_channels=8), path)
    result = invoke(path, "--target", "tfjs")
    assert result.exit_code == 0, result.output
    assert "target tfjs: 0 grouped convs judged" in result.output


def test_tflite_splits_a_grouped_conv_transpose_and_keeps_the_conv(tmp_path):
    # TFLite has no grouped TRANSPOSE_CONV: the ConvTranspose is expanded, the Conv stays native.
    b = GraphBuilder(17, 0)
    y = b.grouped_conv("x", 16, 16, 4, form="native", kernel=(3, 3), pads=[1, 1, 1, 1], name="conv")
    weight = b.const("Wt", b.weight((16, 4, 2, 2), 16))
    y = b.node("ConvTranspose", [y, weight], name="up", group=4, kernel_shape=[2, 2], strides=[2, 2])[0]
    b.nodes.append(helper.make_node("Identity", [y], ["y"], name="output"))
    path = tmp_path / "up.onnx"
    onnx.save(b.model([("x", [1, 16, 8, 8])], [("y", [1, 16, 16, 16])]), path)
    result = gconv_rewrite.rewrite(path, options=gconv_rewrite.Options(target="tflite"))
    assert [r.location for r in result.report.rewrites] == ["up"]
    assert result.report.verification.passed
    rules = {n["location"]: n["rule"] for n in result.report.target["nodes"]}
    assert "TRANSPOSE_CONV" in rules["up"] and "XNNPACK" in rules["conv"]
    assert [n.op_type for n in result.model.graph].count("ConvTranspose") == 4


def mixed_model() -> onnx.ModelProto:
    """Hand-made and native grouped convs with 2, 4, 8 channels per group, and a depthwise one."""
    b = GraphBuilder(17, 0)
    y = b.grouped_conv("x", 16, 16, 4, form="split", kernel=(3, 3), pads=[1, 1, 1, 1])
    y = b.node("Relu", [y])[0]
    y = b.grouped_conv(y, 16, 16, 8, form="native", kernel=(3, 3), pads=[1, 1, 1, 1], name="native8")
    y = b.grouped_conv(y, 16, 16, 16, form="native", kernel=(3, 3), pads=[1, 1, 1, 1], name="depthwise")
    y = b.grouped_conv(y, 16, 16, 2, form="slice", kernel=(1, 1))
    y = b.grouped_conv(y, 16, 16, 8, form="split", kernel=(3, 3), pads=[1, 1, 1, 1])
    b.nodes.append(helper.make_node("Identity", [y], ["y"], name="output"))
    return b.model([("x", [1, 16, 8, 8])], [("y", [1, 16, 8, 8])], name="mixed")


@pytest.mark.parametrize("name", REQUIRED)
def test_every_target_leaves_every_grouped_conv_in_its_form(tmp_path, name):
    path = tmp_path / "mixed.onnx"
    onnx.save(mixed_model(), path)
    result = gconv_rewrite.rewrite(path, output=tmp_path / "out.onnx", options=gconv_rewrite.Options(target=name))
    assert result.report.rewrites and result.report.verification.passed  # every target changes something here
    target = targets.get(name)
    # Every grouped conv left native is one the target wants native...
    written = onnx.load(str(tmp_path / "out.onnx")).graph
    shapes = {i.name: list(i.dims) for i in written.initializer}
    for node in written.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and group > 1:
            weight = shapes[node.input[1]]
            props = ConvProps(groups=group, in_channels=weight[1] * group, out_channels=weight[0])
            assert target.decide(props)[0] == NATIVE, (node.name, props)
    # ...and nothing is left to change: a second run is a no-op (hand-made groups it wants split stay).
    again = gconv_rewrite.rewrite(tmp_path / "out.onnx", apply=False, options=gconv_rewrite.Options(target=name))
    assert again.report.rewrites == []
    assert all(n["action"] == "keep" for n in again.report.target["nodes"])
