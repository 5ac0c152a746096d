"""Fixtures shared by the tests: the fuse harnesses, one per format (tests/harness.py).

The plain helpers live in tests/helpers.py (``from tests.helpers import invoke, op_counts``);
they are also importable from here, as older test modules do."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from samples.models import grouped_block
from tests.harness import FileOutcome, Fusion, KerasFusion, Outcome, TFFusion
from tests.helpers import (
    PATTERN_OPS,
    TOLERANCE,
    as_constant_nodes,
    assert_fused_weights,
    assert_same_outputs,
    attribute,
    constants,
    dead_constants,
    feeds_for,
    nodes,
    op_counts,
    run_conv,
    run_onnx,
    without_attribute,
)

__all__ = [
    "PATTERN_OPS", "TOLERANCE", "FileOutcome", "Fusion", "KerasFusion", "Outcome", "TFFusion", "as_constant_nodes",
    "assert_fused_weights", "assert_same_outputs", "attribute", "constants", "dead_constants", "feeds_for", "nodes",
    "op_counts", "run_conv", "run_onnx", "without_attribute",
]


@pytest.fixture
def fusion(tmp_path: Path) -> Fusion:
    """ONNX: ``fusion.fused(model, groups=...)`` / ``fusion.untouched(model, reason)``."""
    return Fusion(tmp_path)


@pytest.fixture
def tf_fusion(tmp_path: Path) -> TFFusion:
    """TensorFlow SavedModels: ``tf_fusion.fused(module_or_folder, groups=...)`` / ``.untouched``."""
    return TFFusion(tmp_path)


@pytest.fixture
def keras_fusion(tmp_path: Path) -> KerasFusion:
    """Keras files: ``keras_fusion.fused(path_or_model, groups=...)`` / ``.untouched``."""
    return KerasFusion(tmp_path)


@pytest.fixture
def short_timings(monkeypatch):
    """Keep every timing loop short, for tests that check what a benchmark reports, never how fast
    (``pytestmark = pytest.mark.usefixtures("short_timings")``)."""
    from gconv_rewrite import auto, benchmark

    monkeypatch.setattr(benchmark, "WARMUP_SECONDS", 0.0)
    monkeypatch.setattr(benchmark, "BUDGET_SECONDS", 0.05)
    monkeypatch.setattr(benchmark, "MIN_ROUNDS", 3)
    monkeypatch.setattr(auto, "NODE_SECONDS", 1.5)


@pytest.fixture
def small_split(tmp_path: Path) -> Path:
    """small.onnx: one hand-made grouped conv (Split → 4 Conv → Concat, 16 channels)."""
    import onnx

    from samples.models import grouped_block

    path = tmp_path / "small.onnx"
    onnx.save(grouped_block("split", groups=4, channels=16, out_channels=16), path)
    return path


@pytest.fixture
def split_model(tmp_path) -> Path:
    """A Split-form block of 4 hand-made groups, 16 -> 8 channels, saved as block.onnx."""
    path = tmp_path / "block.onnx"
    onnx.save(grouped_block("split", groups=4, channels=16, out_channels=8), path)
    return path
