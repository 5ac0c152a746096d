"""The backend contract (gconv_rewrite.backend): each backend against the roles it claims in
``BACKENDS``, the model-format role (``ModelFormat``) and the rewriter role (``Rewriter``); the
passes as the driver runs them (``apply``), with no wrapper in between; target decisions as one
typed record whose JSON is the report's."""

from __future__ import annotations

import importlib
import inspect
import json

import pytest

from gconv_rewrite import backend as contract
from gconv_rewrite.errors import BadInput
from gconv_rewrite.report import Report
from gconv_rewrite.targets import Decision, target_nodes

pytest.importorskip("tensorflow")


def _members(protocol: type) -> dict[str, object]:
    """A role's methods and attributes, its own and those of the roles it extends."""
    members = {}
    for klass in reversed(protocol.__mro__):
        if klass is object or not getattr(klass, "_is_protocol", False):
            continue
        members.update({name: value for name, value in vars(klass).items() if not name.startswith("_")})
        members.update(dict.fromkeys(getattr(klass, "__annotations__", {}), "attribute"))
    return members


def _call_shape(function) -> tuple[int, set[str]]:
    """(how many positional parameters without a default, the keyword-only names) of a method."""
    parameters = inspect.signature(function).parameters.values()
    positional = sum(p.kind == p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in parameters)
    return positional, {p.name for p in parameters if p.kind == p.KEYWORD_ONLY}


def _backend_class(fmt: str) -> type:
    module, name, _ = contract.BACKENDS[fmt]
    return getattr(importlib.import_module(module), name)


def _departures(cls: type, role: type) -> list[str]:
    """How ``cls`` falls short of ``role``: a member missing, or a method taking other positional
    parameters (the driver passes those by position) or fewer keyword-only ones."""
    wrong = []
    for name, member in _members(role).items():
        if not hasattr(cls, name):
            wrong.append(f"{cls.__name__} has no {name}")
        elif callable(member):
            have, want = _call_shape(getattr(cls, name)), _call_shape(member)
            if have[0] != want[0] or not want[1] <= have[1]:
                wrong.append(f"{cls.__name__}.{name}{tuple(have)} vs {tuple(want)}")
    return wrong


def test_the_roles_split_reading_and_writing_from_rewriting():
    format_role, rewriter_role = set(_members(contract.ModelFormat)), set(_members(contract.Rewriter))
    assert {"name", "suffix", "check", "load", "files_read", "stats", "save", "result"} == format_role
    assert rewriter_role - format_role == {"verify_unchanged", "fuse_passes", "fold_pass", "expand_pass", "apply",
                                           "emit", "verify"}
    assert {roles for _, _, roles in contract.BACKENDS.values()} == {("format", "rewriter"), ("format",)}
    assert contract.BACKENDS["tflite"][2] == ("format",)


@pytest.mark.parametrize("fmt", sorted(contract.BACKENDS))
def test_each_backend_has_the_roles_it_claims(fmt):
    cls = _backend_class(fmt)
    roles = contract.BACKENDS[fmt][2]
    wrong = [line for role in roles for line in _departures(cls, contract.ROLES[role])]
    assert not wrong, "\n".join(wrong)
    if "rewriter" not in roles:  # no stubs that raise: a format-only backend has no pass hook at all
        extra = set(_members(contract.Rewriter)) - set(_members(contract.ModelFormat))
        assert not [name for name in extra if hasattr(cls, name)]


def test_the_contract_check_finds_a_missing_or_misshapen_method():
    class Half:
        name, suffix, check = "half", ".half", None

        def load(self, path, options): ...

        def files_read(self, path, model): ...

        def stats(self, model): ...

        def save(self, model): ...  # one positional parameter short

    assert _departures(Half, contract.ModelFormat) == ["Half.save(2, set()) vs (3, set())", "Half has no result"]


def test_a_format_only_backend_is_refused_as_a_rewriter():
    with pytest.raises(BadInput, match="tflite models are written by --to tflite, not rewritten"):
        contract.rewriter_backend("tflite", Report(input="m.tflite", mode="fuse"))
    assert type(contract.format_backend("tflite", Report(input="m.tflite", mode="fuse"))).__name__ == "TFLiteBackend"


def test_no_backend_wraps_its_passes():
    """The passes are what the backends return: no class that forwards attributes with __getattr__."""
    for fmt in contract.BACKENDS:
        module = importlib.import_module(contract.BACKENDS[fmt][0])
        wrappers = [name for name, value in vars(module).items()
                    if inspect.isclass(value) and value.__module__ == module.__name__ and "__getattr__" in vars(value)]
        assert not wrappers, f"{module.__name__}: {wrappers}"


def test_the_onnx_passes_run_through_apply(tmp_path):
    """ONNX: the fuse passes are the onnx-ir passes themselves; apply runs one in place; the fold
    reads the convs every fuse pass wrote; an expand after a fuse leaves those convs alone."""
    import onnx

    from gconv_rewrite.api import Options
    from gconv_rewrite.passes.onnx.backend import OnnxBackend
    from gconv_rewrite.passes.onnx.fold_batchnorm import FoldBatchNormPass
    from gconv_rewrite.passes.onnx.fuse_qlinear_conv import FuseQLinearConvPass
    from gconv_rewrite.passes.onnx.fuse_split_conv import FuseSplitConvPass
    from samples.models import grouped_block

    path = tmp_path / "m.onnx"
    onnx.save(grouped_block("split"), path)
    onnx_backend = OnnxBackend(Report(input=str(path), mode="fuse"))
    model = onnx_backend.load(path, Options())
    fuse_passes = onnx_backend.fuse_passes(model, rewrite=True, options=Options())
    assert [type(p) for p in fuse_passes] == [FuseSplitConvPass, FuseQLinearConvPass]
    for fuse in fuse_passes:
        assert onnx_backend.apply(fuse, model) is model
    assert [r.kind for r in fuse_passes[0].rewrites] == ["fuse-split-conv"]
    fold = onnx_backend.fold_pass(model, fuse_passes, Options())
    assert isinstance(fold, FoldBatchNormPass) and fold.convs == fuse_passes[0].fused_convs
    expand = onnx_backend.expand_pass(model, rewrite=True, options=Options(), after=fuse_passes)
    onnx_backend.apply(expand, model)
    assert expand.rewrites == [] and expand.skipped == []  # the fused conv is the fuse's: left alone


def test_a_decision_is_the_report_entry():
    decision = Decision(location="concat", graph="", form="native", action="fuse",
                        rule="native for tflite-gpu: multiples of 4")
    (trimmed,) = target_nodes([decision], "tflite-gpu")
    assert trimmed.to_json() == {"location": "concat", "graph": "", "form": "native", "action": "fuse",
                                 "rule": "multiples of 4"}
    assert decision.rule.startswith("native for")  # the pass's record is not changed
    trimmed.native_ms, trimmed.split_ms, trimmed.verdict = 1.5, 2.0, "native"
    trimmed.measurements = [{"kind": "fuse"}]
    assert list(trimmed.to_json()) == ["location", "graph", "form", "action", "rule", "native_ms", "split_ms",
                                       "verdict", "measurements"]
    json.dumps(trimmed.to_json())


def test_a_target_run_reports_decisions_as_json(tmp_path):
    import onnx

    from gconv_rewrite.api import fuse
    from samples.models import grouped_block

    path = tmp_path / "m.onnx"
    onnx.save(grouped_block("split"), path)
    report = fuse(path, target="onnxruntime-cpu").report
    (node,) = report.target["nodes"]
    assert isinstance(node, dict) and node["action"] == "fuse" and node["form"] == "native"
    assert json.loads(json.dumps(report.to_dict()))["target"]["nodes"] == [node]
