"""gconv_rewrite.plan: the format-free fusability rules and weight arithmetic.

Each fusion plan is checked twice: its shape (groups, channels, stacked arrays, attributes) and
its numbers (the plan's weights as one grouped ONNX Conv in onnxruntime equal the branch
convolutions run one by one on their channel ranges and concatenated)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gconv_rewrite.plan import (
    BROADCAST,
    CHANNEL,
    EQUAL,
    TAIL_RULES,
    Branch,
    ChainPlan,
    ConvLayer,
    ExpansionPlan,
    FusionPlan,
    Refusal,
    TailLayer,
    check_channel_ranges,
    plan_chain,
    plan_expansion,
    plan_fusion,
    tail_concat_axis,
)
from tests.conftest import TOLERANCE, run_conv


def make_branches(n: int = 3, width: int = 4, out: int = 2, kernel=(3, 3), *, groups: int = 1,
                  bias=True, attributes: dict | None = None, seed: int = 0,
                  dtype=np.float32) -> list[Branch]:
    """N ONNX-layout branches [out, width/groups, *kernel] reading consecutive channel ranges."""
    rng = np.random.default_rng(seed)
    biases = bias if isinstance(bias, (list, tuple)) else [bias] * n
    attributes = attributes if attributes is not None else {"strides": (1,) * len(kernel)}
    return [Branch(name=f"conv{i}", channel_start=i * width, channel_stop=(i + 1) * width,
                   weight=rng.standard_normal((out, width // groups, *kernel)).astype(dtype),
                   bias=(rng.standard_normal(out) + 1).astype(dtype) if biases[i] else None,
                   groups=groups, out_channels=out, attributes=dict(attributes))
            for i in range(n)]


def onnx_attributes(attributes: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in attributes.items()}


def branch_outputs(x: np.ndarray, branches: list[Branch]) -> np.ndarray:
    """What the unfused graph computes: each branch on its channel range, concatenated."""
    return np.concatenate([
        run_conv(x[:, b.channel_start:b.channel_stop], b.weight, b.bias, group=b.groups,
                 **onnx_attributes(b.attributes))
        for b in branches], axis=1)


def fused_output(x: np.ndarray, plan: FusionPlan) -> np.ndarray:
    return run_conv(x, plan.weight, plan.bias, group=plan.groups, **onnx_attributes(plan.attributes))


def input_for(branches: list[Branch], spatial, seed: int = 1) -> np.ndarray:
    channels = branches[-1].channel_stop
    return np.random.default_rng(seed).standard_normal((2, channels, *spatial)).astype(np.float32)


def refusal(result) -> str:
    assert isinstance(result, Refusal), result
    return result.reason


# -- check_channel_ranges --------------------------------------------------------------------


@pytest.mark.parametrize("ranges,channels", [
    ([(0, 4), (4, 8)], 8),
    ([(0, 1), (1, 2), (2, 3)], 3),
    ([(0, 5), (5, 7)], 7),  # uneven is not this function's business
])
def test_ranges_that_tile_the_source(ranges, channels):
    assert check_channel_ranges(ranges, channels) is None


@pytest.mark.parametrize("ranges,channels,reason", [
    ([(4, 8), (0, 4)], 8, "branches are concatenated out of channel order (4:8,0:4)"),
    ([(0, 4), (8, 12), (4, 8)], 12, "out of channel order (0:4,8:12,4:8)"),
    ([(0, 4), (2, 6)], 6, "channel ranges overlap: 0:4 and 2:6"),
    ([(0, 4), (0, 4)], 4, "channel ranges overlap: 0:4 and 0:4"),
    ([(0, 4), (6, 10)], 10, "channel ranges leave a gap: channels 4:6 are read by no branch"),
    ([(2, 4), (4, 6)], 6, "channels 0:2 are read by no branch"),
    ([(0, 4), (4, 8)], 12, "branches read channels 0:8 of 12; a grouped convolution needs them all"),
    ([(0, 4), (4, 8)], None, "cannot prove the branches cover every channel"),
    ([(0, 4), (4, 4)], 8, "empty channel range 4:4"),
    ([(0, 4), (5, 3)], 8, "empty channel range 5:3"),
])
def test_ranges_refused_with_reason(ranges, channels, reason):
    assert reason in check_channel_ranges(ranges, channels)


def test_overlap_is_reported_before_order():
    # Both out of order and overlapping: the overlap is the deeper problem, and said first.
    assert "overlap" in check_channel_ranges([(2, 6), (0, 4)], 6)


# -- plan_fusion: shape and numbers ----------------------------------------------------------


@pytest.mark.parametrize("kernel,spatial", [((3,), (7,)), ((3, 3), (5, 6)), ((1, 3, 3), (3, 4, 4))],
                         ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("bias", [True, False, (True, False, True), (False, False, True)],
                         ids=["bias", "no-bias", "mixed", "only-last"])
def test_fusion_stacks_weights_and_biases(kernel, spatial, bias):
    branches = make_branches(3, width=4, out=2, kernel=kernel, bias=bias,
                             attributes={"pads": tuple(k // 2 for k in kernel) * 2})
    plan = plan_fusion(branches, 12, stack_axis=0)
    assert isinstance(plan, FusionPlan)
    assert (plan.groups, plan.in_channels, plan.out_channels) == (3, 12, 6)
    assert plan.weight.shape == (6, 4, *kernel) and plan.weight.dtype == np.float32
    np.testing.assert_array_equal(plan.weight, np.concatenate([b.weight for b in branches]))
    if bias is False:
        assert plan.bias is None
    else:
        expected = np.concatenate([b.bias if b.bias is not None else np.zeros(2, np.float32) for b in branches])
        np.testing.assert_array_equal(plan.bias, expected)
        assert plan.bias.dtype == np.float32
    assert plan.attributes == branches[0].attributes
    x = input_for(branches, spatial)
    np.testing.assert_allclose(fused_output(x, plan), branch_outputs(x, branches), rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("inner", [2, 4])
def test_grouped_branches_multiply_groups(inner):
    branches = make_branches(2, width=8, out=4, kernel=(3, 3), groups=inner, attributes={"pads": (1, 1, 1, 1)})
    plan = plan_fusion(branches, 16, stack_axis=0)
    assert plan.groups == 2 * inner and plan.weight.shape == (8, 8 // inner, 3, 3)
    x = input_for(branches, (4, 4))
    np.testing.assert_allclose(fused_output(x, plan), branch_outputs(x, branches), rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("attributes", [
    {"strides": (2, 2), "pads": (1, 0, 0, 1)},
    {"dilations": (2, 1), "pads": (2, 1, 2, 1)},
    {"auto_pad": "SAME_UPPER", "strides": (2, 2)},
    {"auto_pad": "SAME_LOWER"},
    {"auto_pad": "VALID", "dilations": (1, 2)},
])
def test_shared_attributes_carried_over(attributes):
    branches = make_branches(2, width=3, out=2, kernel=(2, 3), attributes=attributes)
    plan = plan_fusion(branches, 6, stack_axis=0)
    assert plan.attributes == attributes and plan.groups == 2
    x = input_for(branches, (6, 7))
    np.testing.assert_allclose(fused_output(x, plan), branch_outputs(x, branches), rtol=TOLERANCE, atol=TOLERANCE)


def test_tensorflow_layout_stacks_on_the_last_axis():
    # TF/Keras kernels are [kH, kW, I/g, O]: the branches stack on O, the last axis.
    onnx_branches = make_branches(2, width=4, out=3, kernel=(3, 3), attributes={"pads": (1, 1, 1, 1)})
    tf_branches = [Branch(b.name, b.channel_start, b.channel_stop, b.weight.transpose(2, 3, 1, 0), b.bias,
                          b.groups, b.out_channels, b.attributes) for b in onnx_branches]
    plan = plan_fusion(tf_branches, 8, stack_axis=-1)
    assert plan.groups == 2 and plan.weight.shape == (3, 3, 4, 6)
    np.testing.assert_array_equal(plan.weight, np.concatenate([b.weight for b in tf_branches], axis=-1))
    as_onnx = FusionPlan(plan.groups, plan.in_channels, plan.out_channels, plan.weight.transpose(3, 2, 0, 1),
                         plan.bias, plan.attributes)
    x = input_for(onnx_branches, (5, 5))
    np.testing.assert_allclose(fused_output(x, as_onnx), branch_outputs(x, onnx_branches), rtol=TOLERANCE,
                               atol=TOLERANCE)


def test_conv_transpose_layout_stacks_on_the_input_axis():
    # ConvTranspose kernels are [I, O/g, k...]: the branches stack on axis 0, the input axis.
    rng = np.random.default_rng(0)
    branches = [Branch(f"t{i}", i * 4, (i + 1) * 4, rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
                       rng.standard_normal(3).astype(np.float32), 1, 3, {"strides": (2, 2)}) for i in range(2)]
    plan = plan_fusion(branches, 8, stack_axis=0)
    assert plan.groups == 2 and plan.weight.shape == (8, 3, 2, 2) and plan.out_channels == 6
    np.testing.assert_array_equal(plan.weight[4:], branches[1].weight)
    x = input_for(branches, (3, 3))
    unfused = np.concatenate([run_conv(x[:, b.channel_start:b.channel_stop], b.weight, b.bias, op="ConvTranspose",
                                       strides=[2, 2]) for b in branches], axis=1)
    fused = run_conv(x, plan.weight, plan.bias, op="ConvTranspose", group=plan.groups, strides=[2, 2])
    assert fused.shape == (2, 6, 6, 6)
    np.testing.assert_allclose(fused, unfused, rtol=TOLERANCE, atol=TOLERANCE)


def test_mixed_bias_keeps_the_bias_dtype():
    branches = make_branches(2, width=2, out=2, kernel=(1, 1), bias=(False, True), dtype=np.float16)
    plan = plan_fusion(branches, 4, stack_axis=0)
    assert plan.bias.dtype == np.float16 and plan.weight.dtype == np.float16
    np.testing.assert_array_equal(plan.bias[:2], np.zeros(2, np.float16))
    np.testing.assert_array_equal(plan.bias[2:], branches[1].bias)


def test_unknown_source_channels_refused():
    branches = make_branches(2)
    assert "channel count is unknown" in refusal(plan_fusion(branches, None, stack_axis=0))


# -- plan_fusion: refusals -------------------------------------------------------------------


def test_fewer_than_two_branches():
    assert refusal(plan_fusion(make_branches(1), 4, stack_axis=0)) == "fewer than two branches"
    assert refusal(plan_fusion([], 4, stack_axis=0)) == "fewer than two branches"


def test_uneven_split():
    branches = make_branches(4, width=16, out=2, kernel=(1, 1), bias=False)
    branches[3] = Branch("conv3", 48, 67, np.ones((2, 19, 1, 1), np.float32), None, 1, 2, dict(branches[0].attributes))
    assert refusal(plan_fusion(branches, 67, stack_axis=0)) == "uneven split: 16,16,16,19 channels"


def test_ranges_are_checked_before_widths():
    branches = make_branches(2)
    branches.reverse()
    assert "out of channel order" in refusal(plan_fusion(branches, 8, stack_axis=0))


def _vary(branches: list[Branch], index: int, **changes) -> list[Branch]:
    branch = branches[index]
    branches[index] = Branch(**{**branch.__dict__, **changes})
    return branches


@pytest.mark.parametrize("change,reason", [
    (lambda bs: _vary(bs, 1, out_channels=3, weight=np.ones((3, 4, 3, 3), np.float32)),
     "branches have different output channel counts: 2,3,2"),
    (lambda bs: _vary(bs, 2, groups=2, weight=np.ones((2, 2, 3, 3), np.float32)),
     "branches have different group counts: 1,1,2"),
    (lambda bs: _vary(bs, 1, weight=np.ones((2, 4, 1, 1), np.float32)),
     "different kernel shapes between branches: (4,3,3) vs (4,1,1)"),
    (lambda bs: _vary(bs, 1, weight=np.ones((2, 4, 3, 3), np.float64)), "branches have weights of different dtypes"),
    (lambda bs: _vary(bs, 0, attributes={"strides": (2, 2)}), "different strides between branches: (2,2) vs (1,1)"),
    (lambda bs: _vary(bs, 2, attributes={"strides": (1, 1), "dilations": (2, 2)}),
     "different dilations between branches: None vs (2,2)"),
    (lambda bs: _vary(bs, 1, attributes={"strides": (1, 1), "auto_pad": "SAME_UPPER"}),
     "different auto_pad between branches: None vs SAME_UPPER"),
])
def test_branches_that_differ_are_refused(change, reason):
    branches = change(make_branches(3, width=4, out=2, kernel=(3, 3)))
    assert refusal(plan_fusion(branches, 12, stack_axis=0)) == reason


def test_equal_attributes_as_lists_or_tuples():
    branches = make_branches(2, kernel=(1, 1), attributes={"strides": (1, 1)})
    branches[1].attributes = {"strides": [1, 1]}
    plan = plan_fusion(branches, 8, stack_axis=0)
    assert isinstance(plan, FusionPlan) and plan.groups == 2
    x = input_for(branches, (3, 3))
    np.testing.assert_allclose(fused_output(x, plan), branch_outputs(x, branches), rtol=TOLERANCE, atol=TOLERANCE)


# -- plan_expansion --------------------------------------------------------------------------


def grouped_weight(groups: int, in_channels: int, out_channels: int, kernel=(3, 3), seed: int = 0):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((out_channels, in_channels // groups, *kernel)).astype(np.float32)
    return weight, (rng.standard_normal(out_channels) + 1).astype(np.float32)


@pytest.mark.parametrize("groups,branches,with_bias", [(4, None, True), (4, 2, False), (8, 4, True), (2, None, False)])
def test_expansion_splits_weights_and_runs_the_same(groups, branches, with_bias):
    weight, bias = grouped_weight(groups, 8, 8)
    bias = bias if with_bias else None
    plan = plan_expansion(weight, bias, groups, 8, stack_axis=0, branches=branches)
    n = branches or groups
    assert isinstance(plan, ExpansionPlan)
    assert plan.branches == n and plan.groups_per_branch == groups // n
    assert plan.channel_ranges == [(i * 8 // n, (i + 1) * 8 // n) for i in range(n)]
    assert [w.shape for w in plan.weights] == [(8 // n, 8 // groups, 3, 3)] * n
    np.testing.assert_array_equal(np.concatenate(plan.weights), weight)
    if with_bias:
        np.testing.assert_array_equal(np.concatenate(plan.biases), bias)
    else:
        assert plan.biases == [None] * n
    x = np.random.default_rng(3).standard_normal((1, 8, 5, 5)).astype(np.float32)
    expanded = np.concatenate([
        run_conv(x[:, start:stop], w, b, group=plan.groups_per_branch, pads=[1, 1, 1, 1])
        for (start, stop), w, b in zip(plan.channel_ranges, plan.weights, plan.biases)], axis=1)
    grouped = run_conv(x, weight, bias, group=groups, pads=[1, 1, 1, 1])
    np.testing.assert_allclose(expanded, grouped, rtol=TOLERANCE, atol=TOLERANCE)


def test_expansion_tensorflow_layout():
    weight = np.arange(3 * 3 * 2 * 8, dtype=np.float32).reshape(3, 3, 2, 8)  # [kH, kW, I/g, O], g=4
    plan = plan_expansion(weight, None, 4, 8, stack_axis=-1)
    assert plan.branches == 4 and [w.shape for w in plan.weights] == [(3, 3, 2, 2)] * 4
    np.testing.assert_array_equal(plan.weights[1], weight[..., 2:4])


@pytest.mark.parametrize("groups,in_channels,out_channels,branches,reason", [
    (1, 8, 8, None, "not a grouped convolution (group=1)"),
    (4, 8, 8, 3, "group=4 cannot be split into 3 branches"),
    (4, 8, 8, 0, "group=4 cannot be split into 0 branches"),
    (4, 8, 8, 1, "group=4 cannot be split into 1 branches"),
])
def test_expansion_refusals(groups, in_channels, out_channels, branches, reason):
    weight, bias = grouped_weight(groups, in_channels, out_channels)
    assert refusal(plan_expansion(weight, bias, groups, in_channels, stack_axis=0, branches=branches)) == reason


def test_expansion_refuses_channels_that_do_not_divide():
    # Inconsistent shapes (3 input channels in 2 groups) are refused, not split unevenly.
    weight = np.ones((6, 2, 1, 1), np.float32)
    assert refusal(plan_expansion(weight, None, 2, 3, stack_axis=0, branches=2)) == \
        "channels do not divide into 2 branches"
    assert refusal(plan_expansion(np.ones((5, 2, 1, 1), np.float32), None, 2, 4, stack_axis=0)) == \
        "channels do not divide into 2 branches"


# -- round trip, property-tested -------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 4), inner=st.sampled_from([1, 2]), width_per_group=st.integers(1, 3),
       out_per_group=st.integers(1, 3), kernel=st.sampled_from([(1,), (3,), (1, 1), (3, 3), (2, 3), (1, 1, 2)]),
       bias=st.lists(st.booleans(), min_size=4, max_size=4), stride=st.integers(1, 2), seed=st.integers(0, 99))
def test_fuse_then_expand_round_trips(n, inner, width_per_group, out_per_group, kernel, bias, stride, seed):
    width, out = width_per_group * inner, out_per_group * inner
    attributes = {"strides": (stride,) * len(kernel)}
    branches = make_branches(n, width=width, out=out, kernel=kernel, groups=inner, bias=bias[:n],
                             attributes=attributes, seed=seed)
    plan = plan_fusion(branches, n * width, stack_axis=0)
    assert plan.groups == n * inner and plan.weight.shape == (n * out, width_per_group, *kernel)
    x = input_for(branches, (4,) * len(kernel), seed=seed)
    np.testing.assert_allclose(fused_output(x, plan), branch_outputs(x, branches), rtol=TOLERANCE, atol=TOLERANCE)

    back = plan_expansion(plan.weight, plan.bias, plan.groups, plan.in_channels, stack_axis=0, branches=n)
    assert back.groups_per_branch == inner
    assert back.channel_ranges == [(b.channel_start, b.channel_stop) for b in branches]
    for original, weight, expanded_bias in zip(branches, back.weights, back.biases):
        np.testing.assert_array_equal(weight, original.weight)
        want = original.bias if original.bias is not None else np.zeros(out, np.float32)
        if plan.bias is None:
            assert expanded_bias is None
        else:
            np.testing.assert_array_equal(expanded_bias, want)


# -- plan_chain: branches that are chains of layers ------------------------------------------


def _chain_layers(n: int, width: int, outs: list[int], kernels: list[int], *, shared: bool = False,
                  seed: int = 0) -> list[list[Branch]]:
    """Per conv layer, the N branches' convs (ONNX layout); the first reads ``width`` channels of
    the source each (all of them when ``shared``), later ones their own branch's channels."""
    rng = np.random.default_rng(seed)
    layers, channels = [], width
    for depth, (out, kernel) in enumerate(zip(outs, kernels)):
        layer = []
        for i in range(n):
            start = 0 if depth or shared else i * width
            layer.append(Branch(name=f"conv{depth}_{i}", channel_start=start, channel_stop=start + channels,
                                weight=rng.standard_normal((out, channels, kernel, kernel)).astype(np.float32),
                                bias=rng.standard_normal(out).astype(np.float32), groups=1, out_channels=out,
                                attributes={"pads": (kernel // 2,) * 4}))
        layers.append(layer)
        channels = out
    return layers


def _reader(steps: list):
    """A ``read_step`` over prepared steps (a ConvLayer's branches, a TailLayer or a Refusal)."""
    seen = []

    def read_step(step, channels):
        seen.append((step, channels))
        return steps[step]
    return read_step, seen


def _run_chain(x: np.ndarray, plan: ChainPlan) -> np.ndarray:
    for step in plan.steps:
        x = fused_output(x, step) if isinstance(step, FusionPlan) else np.maximum(x, 0)
    return x


def _run_branches(x: np.ndarray, layers: list[list[Branch]], shared: bool) -> np.ndarray:
    outputs = []
    for i in range(len(layers[0])):
        first = layers[0][i]
        y = x if shared else x[:, first.channel_start:first.channel_stop]
        for depth, layer in enumerate(layers):
            if depth:
                y = np.maximum(y, 0)
            b = layer[i]
            y = run_conv(y, b.weight, b.bias, **onnx_attributes(b.attributes))
        outputs.append(y)
    return np.concatenate(outputs, axis=1)


RELU = TailLayer("Relu", [{}] * 4, [[]] * 4, [])


@pytest.mark.parametrize("shared", [False, True], ids=["sliced", "shared-input"])
def test_chain_of_two_conv_layers(shared):
    layers = _chain_layers(4, 16 if shared else 4, [4, 6], [1, 3], shared=shared)
    read_step, seen = _reader([ConvLayer(layers[0]), RELU, ConvLayer(layers[1])])
    plan = plan_chain([["Conv", "Relu", "Conv"]] * 4, read_step, 16, conv_kinds=("Conv",), shared_input=shared,
                      stack_axis=0)
    assert isinstance(plan, ChainPlan) and plan.stopped is None
    assert [c.groups for c in plan.convs] == ([1, 4] if shared else [4, 4]) and plan.groups == 4
    assert (plan.convs[0].in_channels, plan.convs[-1].out_channels) == (16, 24)
    assert plan.branch_channels == [6] * 4
    assert seen == [(0, None), (1, [4] * 4), (2, [4] * 4)]  # each step read with its branches' channels
    x = np.random.default_rng(3).standard_normal((2, 16, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(_run_chain(x, plan), _run_branches(x, layers, shared), rtol=TOLERANCE,
                               atol=TOLERANCE)


def test_chain_stops_where_the_branches_differ():
    layers = _chain_layers(2, 4, [4], [3])
    kinds = [["Conv", "Relu"], ["Conv", "Sigmoid"]]
    plan = plan_chain(kinds, _reader([ConvLayer(layers[0])])[0], 8, conv_kinds=("Conv",), shared_input=False,
                      stack_axis=0)
    assert plan.stopped == "where the branches differ (Relu vs Sigmoid)"
    assert len(plan.steps) == 1 and plan.branch_channels == [4, 4]
    assert refusal(plan_chain([["Relu"], ["Sigmoid"]], None, 8, conv_kinds=("Conv",), shared_input=False,
                              stack_axis=0)) == "branches differ here: Relu vs Sigmoid"


def test_chain_stops_at_a_later_conv_that_does_not_fuse():
    layers = _chain_layers(2, 4, [4, 4], [1, 3])
    layers[1][1].attributes = {"pads": (1,) * 4, "strides": (2, 2)}
    layers[1][0].attributes = {"pads": (1,) * 4, "strides": (1, 1)}
    steps = [ConvLayer(layers[0]), RELU, ConvLayer(layers[1])]
    plan = plan_chain([["Conv", "Relu", "Conv"]] * 2, _reader(steps)[0], 8, conv_kinds=("Conv",),
                      shared_input=False, stack_axis=0)
    assert plan.stopped == "the convolution after (different strides between branches: (1,1) vs (2,2))"
    assert len(plan.steps) == 2


def test_chain_first_conv_refusal_refuses_the_candidate():
    layers = _chain_layers(2, 4, [4, 4], [1, 3])
    read_step = _reader([ConvLayer(layers[0][:1] + [layers[0][1]])])[0]
    assert refusal(plan_chain([["Conv"]] * 2, read_step, 12, conv_kinds=("Conv",), shared_input=False,
                              stack_axis=0)) == "branches read channels 0:8 of 12; a grouped convolution needs them all"
    steps = [Refusal("not-constant", "weights of conv0_1 are not constants")]
    assert refusal(plan_chain([["Conv"]] * 2, _reader(steps)[0], 8, conv_kinds=("Conv",), shared_input=False,
                              stack_axis=0)) == "weights of conv0_1 are not constants"


def test_chain_tail_refusal_and_channel_mismatch_and_shortest_branch():
    layers = _chain_layers(2, 4, [4, 4], [1, 3])
    tail = TailLayer("LeakyRelu", [{"alpha": 0.1}, {"alpha": 0.2}], [[], []], [])
    plan = plan_chain([["Conv", "LeakyRelu"]] * 2, _reader([ConvLayer(layers[0]), tail])[0], 8,
                      conv_kinds=("Conv",), shared_input=False, stack_axis=0)
    assert plan.stopped == "LeakyRelu (tails disagree between branches: LeakyRelu alpha 0.1 vs 0.2)"
    wrong = [Branch(**{**b.__dict__, "channel_stop": 3}) for b in layers[1]]
    plan = plan_chain([["Conv", "Conv"]] * 2, _reader([ConvLayer(layers[0]), ConvLayer(wrong)])[0], 8,
                      conv_kinds=("Conv",), shared_input=False, stack_axis=0)
    assert plan.stopped == "the convolution after (conv1_0 expects 3 channels, its branch has 4)"
    plan = plan_chain([["Conv", "Relu"], ["Conv"]], _reader([ConvLayer(layers[0])])[0], 8, conv_kinds=("Conv",),
                      shared_input=False, stack_axis=0)
    assert plan.stopped == "the end of the shortest branch"


def test_chain_tail_parameters_concatenate():
    layers = _chain_layers(2, 4, [3], [1])
    scales = [np.arange(3, dtype=np.float32), np.arange(3, 6, dtype=np.float32)]
    tail = TailLayer("Mul", [{}, {}], [[scales[0]], [scales[1]]], [0])
    plan = plan_chain([["Conv", "Mul"]] * 2, _reader([ConvLayer(layers[0]), tail])[0], 8, conv_kinds=("Conv",),
                      shared_input=False, stack_axis=0)
    assert plan.stopped is None
    np.testing.assert_array_equal(plan.steps[1][0], np.arange(6, dtype=np.float32))


@pytest.mark.parametrize("rule, shape, expected", [
    (CHANNEL, (6,), 0),
    (CHANNEL, (3,), "parameter of shape [3] is not per-channel"),
    (EQUAL, (2,), None),
    (BROADCAST, (6,), None),  # aligned on the right: it meets W, not the channels; equal in every branch
    (BROADCAST, (1, 6, 1, 1), 1),
    (BROADCAST, (), None),
    (BROADCAST, (1, 1, 1, 1), None),
    (BROADCAST, (1, 5, 1, 1), "constant of shape [1, 5, 1, 1] is not per-channel"),
    (BROADCAST, (1, 1, 1, 1, 1), "constant of rank 5 broadcasts the branch"),
])
def test_tail_concat_axis_nchw(rule, shape, expected):
    # A rank-4 NCHW branch tensor with 6 channels on axis 1.
    assert tail_concat_axis(rule, shape, 1, 4, 6) == expected


def test_tail_rules_table():
    assert TAIL_RULES["BatchNorm"].params == (CHANNEL,) * 4
    assert TAIL_RULES["Relu"].params == () and TAIL_RULES["Clip"].params == (EQUAL, EQUAL)
    assert all(TAIL_RULES[k].params == (BROADCAST,) for k in ("Add", "Sub", "Mul", "Div", "Max", "Min"))
    assert tail_concat_axis(BROADCAST, (6,), 3, 4, 6) == 0  # NHWC: a vector meets the channel axis
