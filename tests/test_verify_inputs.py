"""Verification inputs and coverage: default batch, memory limit, every dtype and rank 0, and
rewrites inside If/Loop bodies run on their own (issues 12 and 13.3, 13.9, 13.12)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import gconv_rewrite
from gconv_rewrite.errors import VerificationImpossible
from gconv_rewrite.report import Rewrite, Verification, format_summary
from gconv_rewrite.verify import InputSpec, make_inputs, verify_subgraphs
from samples.models import GraphBuilder, grouped_block
from tests.helpers import invoke


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _with_dims(model: onnx.ModelProto, dims: dict[int, str | None], name: str = "x") -> onnx.ModelProto:
    """Make dims of input ``name`` dynamic: a dim_param (str) or a dim with neither value nor param."""
    (info,) = [i for i in model.graph.input if i.name == name]
    for position, param in dims.items():
        dim = info.type.tensor_type.shape.dim[position]
        dim.Clear()
        if param is not None:
            dim.dim_param = param
    return model


# -- A. batch defaults -----------------------------------------------------------------------------


@pytest.mark.parametrize("param", ["unk__5156", "batch_size", None], ids=["tf2onnx", "pytorch", "unnamed"])
def test_onnx_dynamic_batch_needs_no_flag(tmp_path, param):
    path = _save(_with_dims(grouped_block("slice", groups=2, channels=8, out_channels=8), {0: param}),
                 tmp_path / "model.onnx")
    result = invoke(path, "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "verification: passed at x=1x8x8x8 (batch set to 1)" in result.output
    verification = json.loads((tmp_path / "r.json").read_text())["models"][0]["report"]["verification"]
    assert verification["inputs"] == {"x": [1, 8, 8, 8]}
    assert verification["defaulted"] == {"x": [0]}


def test_shape_flag_wins_over_the_batch_default(tmp_path):
    path = _save(_with_dims(grouped_block("slice", groups=2, channels=8, out_channels=8), {0: "unk__1"}),
                 tmp_path / "model.onnx")
    result = invoke(path, "--shape", "x=3,8,8,8", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "batch set to 1" not in result.output and "3x8x8x8" in result.output
    verification = json.loads((tmp_path / "r.json").read_text())["models"][0]["report"]["verification"]
    assert verification["inputs"] == {"x": [3, 8, 8, 8]} and verification["defaulted"] == {}


def test_static_model_summary_is_unchanged(tmp_path):
    path = _save(grouped_block("split", groups=2, channels=8, out_channels=8), tmp_path / "model.onnx")
    result = invoke(path)
    assert result.exit_code == 0, result.output
    assert "verification: passed (atol=0.0001, rtol=0.001)" in result.output


@pytest.mark.parametrize("dims, named, example", [
    ({0: "unk__1", 2: "height"}, "height", "--shape x=1,8,N,8"),
    ({2: None}, "dim 2", "--shape x=1,8,N,8"),
    # A dim named at position 0 that also names another position is no batch: it is not guessed.
    ({0: "n", 3: "n"}, "n, n", "--shape x=N,8,8,N"),
])
def test_other_dynamic_dims_still_need_shape(tmp_path, dims, named, example):
    path = _save(_with_dims(grouped_block("slice", groups=2, channels=8, out_channels=8), dims),
                 tmp_path / "model.onnx")
    result = invoke(path)
    assert result.exit_code == 2
    assert f"input 'x' has dynamic dims ({named})" in result.output and example in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "model.fused.onnx").exists()


FIXTURES = Path(__file__).parent / "fixtures"
DYNAMIC_BATCH_FILES = [FIXTURES / "tf2onnx" / "keras_slice_conv.onnx", FIXTURES / "tf2onnx" / "keras_lambda_resnext.onnx",
                       FIXTURES / "torch" / "torch_chunk_conv2d_dynbatch.onnx",
                       FIXTURES / "torch" / "torch_chunk_conv2d_dynamo_dynbatch.onnx"]


@pytest.mark.parametrize("path", DYNAMIC_BATCH_FILES, ids=[p.stem for p in DYNAMIC_BATCH_FILES])
def test_real_exporter_files_with_a_dynamic_batch_need_no_flag(path, tmp_path):
    # tf2onnx's unk__N and the PyTorch exporters' dynamic_axes batch, as they wrote them.
    result = invoke(path, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output
    assert "(batch set to 1)" in result.output and "verification: passed at x=1x" in result.output


def _savedmodel(path: Path, shape) -> Path:
    from tests.tf_models import SplitConvConcat, save_module

    return save_module(SplitConvConcat(), path, shape=shape)


def test_savedmodel_none_batch_needs_no_flag(tmp_path):
    path = _savedmodel(tmp_path / "sm", (None, 8, 8, 16))
    result = invoke(path, "-o", tmp_path / "out", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "verification: passed at x=1x8x8x16 (batch set to 1)" in result.output
    verification = json.loads((tmp_path / "r.json").read_text())["models"][0]["report"]["verification"]
    assert verification["inputs"] == {"x": [1, 8, 8, 16]} and verification["defaulted"] == {"x": [0]}
    assert all(r["exercised"] for r in json.loads((tmp_path / "r.json").read_text())["models"][0]["report"]["rewrites"])


def test_savedmodel_other_none_dims_need_shape(tmp_path):
    path = _savedmodel(tmp_path / "sm", (None, None, 8, 16))
    with pytest.raises(VerificationImpossible, match=r"input 'x' has dynamic dims \(dim 1\).*--shape x=1,N,8,16"):
        gconv_rewrite.fuse(path, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _keras_sliced(path: Path, shape=(8, 8, 8)) -> Path:
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape, name="img")
    branches = [keras.layers.Conv2D(4, 3, padding="same")(inputs[..., i * 4:(i + 1) * 4]) for i in range(2)]
    keras.Model(inputs, keras.layers.Concatenate()(branches)).save(path)
    return path


def test_keras_none_batch_needs_no_flag(tmp_path):
    path = _keras_sliced(tmp_path / "m.keras")
    result = invoke(path, "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "verification: passed at img=1x8x8x8 (batch set to 1)" in result.output
    verification = json.loads((tmp_path / "r.json").read_text())["models"][0]["report"]["verification"]
    assert verification["inputs"] == {"img": [1, 8, 8, 8]} and verification["defaulted"] == {"img": [0]}
    assert invoke(path, "--shape", "img=2,8,8,8", "-o", tmp_path / "b.keras").exit_code == 0


def test_keras_other_none_dims_need_shape(tmp_path):
    path = _keras_sliced(tmp_path / "m.keras", shape=(None, 8, 8))
    with pytest.raises(VerificationImpossible, match=r"input 'img' has dynamic dims \(dim 1\).*--shape img=1,N,8,8"):
        gconv_rewrite.fuse(path, output=tmp_path / "out.keras")


# -- B. memory limit -------------------------------------------------------------------------------


def test_huge_declared_dim_is_refused_before_allocating(tmp_path):
    model = grouped_block("slice", groups=2, channels=8, out_channels=8)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 10**9
    path = _save(model, tmp_path / "model.onnx")
    result = invoke(path)
    assert result.exit_code == 2, result.output
    assert "MemoryError" not in result.output and len(result.output.strip().splitlines()) == 1
    assert "input 'x': 1000000000x8x8x8 float32" in result.output
    assert "limit" in result.output and "--shape x=N,8,8,8" in result.output


def test_huge_shape_flag_is_refused_too(tmp_path):
    path = _save(_with_dims(grouped_block("slice", groups=2, channels=8, out_channels=8), {0: "unk__1"}),
                 tmp_path / "model.onnx")
    result = invoke(path, "--shape", "x=100000,8,8,100000")
    assert result.exit_code == 2 and "over the" in result.output and "--shape x=" in result.output


def test_huge_declared_output_is_refused(tmp_path):
    # Small input, an output of 2^30 floats: refused from the declared shapes, before running.
    b = GraphBuilder(17)
    y = b.grouped_conv("x", 8, 8, 2, form="slice", pads=[1, 1, 1, 1])
    b.node("Tile", [y, b.const("repeats", np.array([1, 1, 1, 1 << 24], np.int64))], name="tile")
    b.nodes[-1].output[0] = "y"
    path = _save(b.model([("x", [1, 8, 8, 8])], [("y", [1, 8, 8, 8 << 24])]), tmp_path / "model.onnx")
    result = invoke(path)
    assert result.exit_code == 2, result.output
    assert "verification outputs would take" in result.output and "output 'y'" in result.output


def test_savedmodel_huge_batch_is_refused(tmp_path):
    # 2·10^6 × 8×8×16 floats = 7.6 GiB (TensorFlow's own freezing crashes near 2^31 elements).
    path = _savedmodel(tmp_path / "sm", (2_000_000, 8, 8, 16))
    with pytest.raises(VerificationImpossible, match=r"input 'x'.*--shape x=N,8,8,16"):
        gconv_rewrite.fuse(path, output=tmp_path / "out")


# -- C. every dtype, rank 0 ------------------------------------------------------------------------

GENERATED = ["BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "FLOAT16",
             "FLOAT", "DOUBLE", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E5M2", "STRING"]


def _block_with_extra_input(type_name: str, shape) -> onnx.ModelProto:
    """The grouped block plus an input of another type, passed to an output (as float, or as it is
    for strings and bool)."""
    model = grouped_block("slice", groups=2, channels=8, out_channels=8)
    code = getattr(TensorProto, type_name)
    model.graph.input.append(helper.make_tensor_value_info("extra", code, shape))
    if type_name == "STRING":
        node, out_type = helper.make_node("Identity", ["extra"], ["extra_out"]), code
    elif type_name == "BOOL":
        node, out_type = helper.make_node("Not", ["extra"], ["extra_out"]), code
    else:
        node, out_type = helper.make_node("Cast", ["extra"], ["extra_out"], to=TensorProto.FLOAT), TensorProto.FLOAT
    model.graph.node.append(node)
    model.graph.output.append(helper.make_tensor_value_info("extra_out", out_type, shape))
    model.opset_import[0].version = 21
    model.ir_version = 10
    return model


@pytest.mark.parametrize("shape", [[], [2, 3]], ids=["rank0", "rank2"])
@pytest.mark.parametrize("type_name", GENERATED)
def test_every_onnx_dtype_gets_valid_inputs(tmp_path, type_name, shape):
    path = _save(_block_with_extra_input(type_name, shape), tmp_path / "model.onnx")
    report = gconv_rewrite.fuse(path, output=tmp_path / "out.onnx").report
    assert report.verification.passed
    assert report.verification.inputs["extra"] == shape
    assert [o.name for o in report.verification.outputs] == ["y", "extra_out"]


def test_rank0_bool_input_via_cli(tmp_path):
    path = _save(_block_with_extra_input("BOOL", []), tmp_path / "model.onnx")
    result = invoke(path)
    assert result.exit_code == 0, result.output
    assert "numpy.bool" not in result.output


@pytest.mark.parametrize("dtype", ["bool", "int32", "float16", "bfloat16", "string", "tensor(bool)", "uint64"])
def test_make_inputs_gives_arrays_for_every_format_spelling(dtype):
    feeds = make_inputs([InputSpec("a", [], dtype), InputSpec("b", [None, 2], dtype)], shapes={}, seed=0,
                        given=None)
    assert all(isinstance(v, np.ndarray) for v in feeds.values())
    assert feeds["a"].shape == () and feeds["b"].shape == (1, 2) and feeds.defaulted == {"b": [0]}


@pytest.mark.parametrize("dtype", ["complex64", "tensor(int4)", "qint8"])
def test_types_without_inputs_are_a_clear_refusal(dtype):
    with pytest.raises(VerificationImpossible, match=r"input 'a' has type .*--inputs FILE.npz"):
        make_inputs([InputSpec("a", [2], dtype)], shapes={}, seed=0, given=None)


def test_unknown_rank_needs_shape():
    with pytest.raises(VerificationImpossible, match=r"input 'a' has an unknown rank.*--shape a="):
        make_inputs([InputSpec("a", None, "float32")], shapes={}, seed=0, given=None)
    assert make_inputs([InputSpec("a", None, "float32")], shapes={"a": [2, 3]}, seed=0,
                       given=None)["a"].shape == (2, 3)


# -- D. rewrites inside If / Loop bodies -----------------------------------------------------------


def _branch(seed: int, name: str, out: str, reads: str = "x") -> onnx.GraphProto:
    """A subgraph holding a hand-made grouped conv of the outer-scope value ``reads``."""
    b = GraphBuilder(17, seed)
    b._count = 100 * seed
    y = b.grouped_conv(reads, 8, 8, 2, form="split", pads=[1, 1, 1, 1])
    b.nodes.append(helper.make_node("Relu", [y], [out], name=f"{name}_relu"))
    return helper.make_graph(b.nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None] * 4)],
                             initializer=b.initializers)


def _if_model(else_reads: str = "x") -> onnx.ModelProto:
    nodes = []
    if else_reads != "x":  # a value whose dims shape inference cannot know
        nodes += [helper.make_node("Shape", ["x"], ["x_shape"]),
                  helper.make_node("Reshape", ["x", "x_shape"], [else_reads])]
    nodes.append(helper.make_node("If", ["cond"], ["y"], name="if",
                                  then_branch=_branch(1, "then", "t"), else_branch=_branch(2, "else", "e", else_reads)))
    graph = helper.make_graph(nodes, "outer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["unk__3", 8, 5, 5]),
                               helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_both_branches_of_an_if_are_verified(tmp_path):
    path = _save(_if_model(), tmp_path / "if.onnx")
    result = invoke(path, "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())["models"][0]["report"]
    assert len(report["rewrites"]) == 2
    assert [r["exercised"] for r in report["rewrites"]] == [True, True]
    assert sorted(r["exercised_by"] for r in report["rewrites"]) == [
        "if.else_branch run as its own model", "if.then_branch run as its own model"]
    names = [o["name"] for o in report["verification"]["outputs"]]
    assert names == ["y", "if.else_branch:e", "if.then_branch:t"]
    assert "rewrites exercised" not in result.output  # all of them were


def test_a_wrong_rewrite_in_the_branch_not_taken_fails_verification(tmp_path):
    original = _save(_if_model(), tmp_path / "a.onnx")
    broken = _if_model()
    # cond is True: break the else branch, which the plain run never runs.
    branches = {a.name: a.g for a in broken.graph.node[0].attribute}
    else_branch = branches["else_branch"]
    (weight,) = [w for w in else_branch.initializer if w.dims and len(w.dims) == 4][:1]
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) + 1, weight.name))
    rewritten = _save(broken, tmp_path / "b.onnx")
    inputs = {"x": np.ones((1, 8, 5, 5), np.float32), "cond": np.array(True)}
    verification = gconv_rewrite.verify(original, rewritten, inputs=inputs)
    assert verification.passed  # the plain run takes one branch only
    rewrites = [Rewrite("fuse-split-conv", n.name, 2, {"in": 8, "out": 8}, [], graph=g.name)
                for g in branches.values() for n in g.node if n.op_type == "Conv"][::2]
    verify_subgraphs(original, rewritten, rewrites, verification, seed=0, scratch=tmp_path)
    assert not verification.passed
    assert [o.passed for o in verification.outputs if o.name.startswith("if.else_branch")] == [False]
    assert [o.passed for o in verification.outputs if o.name.startswith("if.then_branch")] == [True]


def test_rewrites_verification_cannot_reach_are_reported(tmp_path):
    path = _save(_if_model(else_reads="x_any"), tmp_path / "if.onnx")
    result = gconv_rewrite.fuse(path, output=tmp_path / "out.onnx")
    by_graph = {r.graph: r for r in result.report.rewrites}
    assert by_graph["then"].exercised is True
    assert by_graph["else"].exercised is False
    assert by_graph["else"].exercised_by == "in if.else_branch, not run on its own: the shape of 'x_any' is not known " \
        "before running"
    summary = format_summary(result.report)
    assert "1 of 2 rewrites exercised by verification; not exercised:" in summary


def test_rewrite_in_a_loop_body_is_verified(tmp_path):
    body_branch = _branch(3, "body", "acc_out", reads="acc")
    body = helper.make_graph(
        list(body_branch.node) + [helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc", TensorProto.FLOAT, [None] * 4)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [None] * 4)],
        initializer=list(body_branch.initializer))
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], name="loop", body=body)], "outer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 5]),
         helper.make_tensor_value_info("trips", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    report = gconv_rewrite.fuse(_save(model, tmp_path / "loop.onnx"), output=tmp_path / "out.onnx").report
    (rewrite,) = report.rewrites
    assert rewrite.exercised is True and rewrite.exercised_by == "loop.body run as its own model"
    assert "loop.body:acc_out" in [o.name for o in report.verification.outputs]


def test_nothing_counts_as_exercised_without_a_run(tmp_path):
    report = gconv_rewrite.check(_save(grouped_block("split", groups=2, channels=8, out_channels=8), tmp_path / "m.onnx"))
    assert [r.exercised for r in report.rewrites] == [None]  # nothing ran
    verification = Verification(ran=True, passed=True, atol=1e-4, rtol=1e-3)
    assert "exercised" not in "\n".join(format_summary(report).splitlines())
    assert verification.defaulted == {}


def test_nested_ifs_and_repeated_node_names_are_each_verified(tmp_path):
    # The inner If's branches are one builder's output twice: the same node names in both.
    inner = helper.make_node("If", ["cond"], ["inner_y"], name="inner_if",
                             then_branch=_branch(1, "then", "t", reads="xr"),
                             else_branch=_branch(1, "else", "t", reads="xr"))
    outer_then = helper.make_graph([helper.make_node("Relu", ["x"], ["xr"], name="relu_x"), inner], "outer_then",
                                   [], [helper.make_tensor_value_info("inner_y", TensorProto.FLOAT, [None] * 4)])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="outer_if", then_branch=outer_then,
                          else_branch=_branch(3, "outer_else", "oe"))], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["unk__1", 8, 5, 5]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    report = gconv_rewrite.fuse(_save(model, tmp_path / "nested.onnx"), output=tmp_path / "out.onnx").report
    assert len(report.rewrites) == 3 and all(r.exercised for r in report.rewrites)
    assert {o.name for o in report.verification.outputs} == {
        "y", "outer_if.else_branch:oe", "outer_if.then_branch/inner_if.then_branch:t",
        "outer_if.then_branch/inner_if.else_branch:t"}
    by_graph = {r.graph: r.exercised_by for r in report.rewrites}
    assert by_graph["else"] == "outer_if.then_branch/inner_if.else_branch run as its own model"


def _function_model(called_from_branch: bool) -> onnx.ModelProto:
    """A local function holding a hand-made grouped conv (weights as Constant nodes), called from
    the main graph or from one branch of an If."""
    body = _branch(4, "body", "out")
    constants = [helper.make_node("Constant", [], [i.name], value=i) for i in body.initializer]
    function = helper.make_function("local", "gblock", ["x"], ["out"], constants + list(body.node),
                                    [helper.make_opsetid("", 17)])
    call = helper.make_node("gblock", ["x"], ["y" if not called_from_branch else "called"], domain="local",
                            name="call")
    if called_from_branch:
        branch = lambda nodes, name, out: helper.make_graph(
            nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None] * 4)])
        nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch(
            [helper.make_node("Identity", ["x"], ["same"])], "then", "same"),
            else_branch=branch([call], "else", "called"))]
    else:
        nodes = [call]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 5]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[function])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("from_branch", [False, True], ids=["main-graph", "if-branch"])
def test_rewrites_in_local_functions_count_where_they_are_called(tmp_path, from_branch):
    report = gconv_rewrite.fuse(_save(_function_model(from_branch), tmp_path / "f.onnx"),
                           output=tmp_path / "out.onnx").report
    (rewrite,) = report.rewrites
    assert rewrite.graph == "function gblock" and rewrite.exercised is True
    assert rewrite.exercised_by == ("if.else_branch run as its own model" if from_branch
                                    else "model run (the main graph calls function gblock)")
