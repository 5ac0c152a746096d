"""Property fuzzing: random graphs holding zero, one or many candidates (some of them near
misses) among unrelated ops. Fusion must never change outputs, never produce an invalid model,
and be deterministic and idempotent. Run with --hypothesis-show-statistics to see the case count."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gconv_rewrite
from samples.models import GraphBuilder
from tests.helpers import digest

segment = st.one_of(
    st.tuples(st.just("candidate"), st.sampled_from(["split", "slice"]), st.sampled_from([2, 4]),
              st.sampled_from([(1, 1), (3, 3)]), st.booleans(), st.sampled_from([None, "stride", "uneven_use"])),
    st.tuples(st.just("op"), st.sampled_from(["Relu", "Sigmoid", "AddConst", "MulConst", "Identity"])),
)


def build(segments, channels: int, opset: int) -> tuple[onnx.ModelProto, int]:
    """The model and how many of its candidates are fusable."""
    b = GraphBuilder(opset=opset, seed=len(segments))
    x, fusable = "x", 0
    for seg in segments:
        if seg[0] == "op":
            kind = seg[1]
            if kind in ("AddConst", "MulConst"):
                c = b.const("c", (b.rng.standard_normal((1, channels, 1, 1)) * 0.5).astype(np.float32))
                x = b.node(kind[:3], [x, c])[0]
            else:
                x = b.node(kind, [x])[0]
            continue
        _, form, groups, kernel, bias, near_miss = seg
        pads = [kernel[0] // 2] * 4
        if near_miss == "stride":
            # Branch 0 differs in dilation: a near miss, left alone.
            y = b.grouped_conv(x, channels, channels, groups, form=form, kernel=kernel, bias=bias, pads=pads)
            conv = next(n for n in b.nodes if n.op_type == "Conv" and n.input[0] != x and
                        n.output[0] in b.nodes[-1].input)
            conv.attribute.append(onnx.helper.make_attribute("dilations", [2, 2]))
            for attr in conv.attribute:
                if attr.name == "pads":
                    attr.ints[:] = [kernel[0] // 2 * 2] * 4
            x = y
        elif near_miss == "uneven_use":
            # A branch output also feeds the graph elsewhere: left alone.
            y = b.grouped_conv(x, channels, channels, groups, form=form, kernel=kernel, bias=bias, pads=pads)
            branch = b.nodes[-1].input[0]
            side = b.node("ReduceMean", [branch], keepdims=1, axes=[1]) if opset < 18 else \
                b.node("ReduceMean", [branch, b.const("axes", np.array([1], np.int64))], keepdims=1)
            x = b.node("Add", [y, side[0]])[0]
        else:
            x = b.grouped_conv(x, channels, channels, groups, form=form, kernel=kernel, bias=bias, pads=pads)
            fusable += 1
    b.nodes.append(onnx.helper.make_node("Identity", [x], ["y"], name="out"))
    return b.model([("x", [1, channels, 6, 6])], [("y", [1, channels, 6, 6])]), fusable


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments=st.lists(segment, min_size=0, max_size=5), channels=st.sampled_from([4, 8, 16]),
       opset=st.sampled_from([11, 13, 17, 18, 21]))
def test_fusion_never_changes_outputs_and_is_stable(segments, channels, opset):
    model, fusable = build(segments, channels, opset)
    onnx.checker.check_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "m.onnx"
        onnx.save(model, source)
        result = gconv_rewrite.fuse(source, output=tmp / "a.onnx")  # raises VerificationFailed on any change
        # (A per-channel constant op right after a fused group folds into it: its own record.)
        assert len([r for r in result.report.rewrites if r.kind != "fold-batchnorm"]) == fusable
        near_misses = sum(1 for s in segments if s[0] == "candidate" and s[5] is not None)
        assert len(result.report.skipped) == near_misses
        if fusable:
            assert result.report.verification.passed
        onnx.checker.check_model(str(tmp / "a.onnx"))
        fused = onnx.load(str(tmp / "a.onnx"))
        convs = [n for n in fused.graph.node if n.op_type == "Conv"]
        assert sum(1 for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)) == fusable
        gconv_rewrite.fuse(source, output=tmp / "b.onnx")
        assert digest(tmp / "a.onnx") == digest(tmp / "b.onnx"), "fusion must be deterministic"
        again = gconv_rewrite.fuse(tmp / "a.onnx", output=tmp / "c.onnx")
        assert again.report.rewrites == [], "fusion must be idempotent"
        assert digest(tmp / "c.onnx") == digest(tmp / "a.onnx")
