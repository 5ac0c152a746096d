"""One chain planner for every format: ONNX chains go through ``gconv_rewrite.plan.plan_chain`` as TF
and Keras chains do; ``plan_fusion(shared_input=True)`` is the wide conv of branches that read one
whole tensor; the planner's sentences exist once (ONNX's structural pre-check asks it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import gconv_rewrite
from gconv_rewrite import plan as plan_module
from gconv_rewrite.passes.onnx import fuse_split_conv
from gconv_rewrite.plan import Branch, ChainPlan, ConvLayer, FusionPlan, Refusal, TailLayer, plan_chain, plan_fusion

REPO = Path(__file__).resolve().parents[1]


def _branch(name, start, stop, *, out=4, kernel=3, groups=1, seed=0):
    weight = np.random.default_rng(seed).standard_normal((out, (stop - start) // groups, kernel, kernel))
    return Branch(name, start, stop, weight.astype(np.float32), np.full(out, seed, np.float32), groups, out,
                  {"strides": (1, 1)})


@pytest.mark.parametrize("sample,groups", [("grouped_split.onnx", None), ("grouped_slice.onnx", None)])
def test_onnx_chains_are_planned_by_plan_chain(monkeypatch, sample, groups):
    calls = []

    def counting(*args, **kwargs):
        result = plan_chain(*args, **kwargs)
        calls.append(result)
        return result

    monkeypatch.setattr(fuse_split_conv, "plan_chain", counting)
    report = gconv_rewrite.check(REPO / "samples" / sample)
    assert report.rewrites, "the sample holds a hand-made group"
    assert len(calls) == len(report.rewrites)
    assert all(isinstance(c, ChainPlan) and c.stopped is None for c in calls)
    assert [r.groups for r in report.rewrites] == [c.groups for c in calls]


def test_onnx_near_miss_refusal_comes_from_the_planner(monkeypatch):
    # The planner's words, with its code: nothing in the ONNX pass restates them.
    report = gconv_rewrite.check(REPO / "samples" / "near_miss_strides.onnx")
    (skip,) = report.skipped
    assert (skip.code, skip.reason) == ("attribute-mismatch", "different dilations between branches: (1,1) vs (2,2)")
    monkeypatch.setattr(plan_module, "_describe", lambda value: f"<{value}>")
    # settings_refusal is the planner's: rewording it there rewords the ONNX skip.
    (skip,) = gconv_rewrite.check(REPO / "samples" / "near_miss_strides.onnx").skipped
    assert skip.reason == "different dilations between branches: <(1, 1)> vs <(2, 2)>"


def test_shared_input_is_a_parameter_of_plan_fusion():
    branches = [_branch("a", 0, 8, out=4, seed=1), _branch("b", 0, 8, out=6, seed=2)]
    wide = plan_fusion(branches, None, stack_axis=0, shared_input=True)
    assert isinstance(wide, FusionPlan)
    assert (wide.groups, wide.in_channels, wide.out_channels) == (1, 8, 10)
    assert wide.weight.shape == (10, 8, 3, 3)
    np.testing.assert_array_equal(wide.weight[4:], branches[1].weight)
    np.testing.assert_array_equal(wide.bias, np.concatenate([branches[0].bias, branches[1].bias]))
    # Without shared_input the same branches read one range twice.
    assert plan_fusion(branches, 8, stack_axis=0).code == "ranges-overlap"
    grouped = [_branch("a", 0, 8, groups=2), _branch("b", 0, 8, groups=2)]
    refusal = plan_fusion(grouped, None, stack_axis=0, shared_input=True)
    assert (refusal.code, refusal.reason) == \
        ("groups-differ", "branches that read the whole input must be plain convolutions (group=1)")
    assert not hasattr(plan_module, "plan_shared_input")


def test_a_refusal_before_the_first_conv_refuses_the_candidate():
    """A layout op before the conv (tf2onnx's per-branch Transpose) fuses with the conv or not at all."""
    transpose = TailLayer("Transpose", [{"perm": (0, 3, 1, 2)}] * 2, [[], []], [])
    convs = ConvLayer([_branch("a", 0, 4), _branch("b", 4, 8, kernel=1)])
    steps = {0: transpose, 1: convs}
    plan = plan_chain([["Transpose", "Conv"]] * 2, lambda step, _: steps[step], 8, conv_kinds=("Conv",),
                      shared_input=False, stack_axis=0)
    assert isinstance(plan, Refusal) and plan.code == "kernel-mismatch"
    differ = plan_chain([["Transpose", "Conv"], ["Transpose", "ConvTranspose"]], lambda step, _: steps[step], 8,
                        conv_kinds=("Conv", "ConvTranspose"), shared_input=False, stack_axis=0)
    assert isinstance(differ, Refusal) and differ.code == "branches-differ"
    steps[1] = ConvLayer([_branch("a", 0, 4), _branch("b", 4, 8)])
    fused = plan_chain([["Transpose", "Conv"]] * 2, lambda step, _: steps[step], 8, conv_kinds=("Conv",),
                       shared_input=False, stack_axis=0)
    assert isinstance(fused, ChainPlan) and fused.stopped is None and fused.groups == 2
