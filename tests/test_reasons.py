"""One way to say no: every refusal carries a stable code, listed once (``gconv_rewrite.reasons.CODES``),
documented in docs/REASONS.md, and carried by every skip of a report (JSON ``code``, and the text
line), in every format."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gconv_rewrite.cli import main as cli_main
from gconv_rewrite.plan import Branch, Refusal, plan_chain, plan_fusion
from gconv_rewrite.reasons import CODES, Refused
from gconv_rewrite.report import Report, Skip, format_summary

REPO = Path(__file__).resolve().parents[1]

# A code written where a refusal or a skip is made: Refusal("code", ...), Refused("code", ...) and
# its subclasses, Skip(..., code="code"), and the conditional of ``plan.tail_refusal``.
CODE_SITES = re.compile(r'\b(?:Refusal|Refused|UnreadableRange|NotExact)\(\s*"([^"]*)"'
                        r'|\bcode="([^"]*)"'
                        r'|Refusal\("[a-z-]+" if \w+ else "([a-z-]+)"')


def codes_in_source() -> dict[str, list[str]]:
    """Every code literal the source writes, with the files that write it."""
    found: dict[str, list[str]] = {}
    for path in sorted([*REPO.glob("rewriter/*.py"), *REPO.glob("passes/**/*.py")]):
        for match in CODE_SITES.finditer(path.read_text(encoding="utf-8")):
            code = next(group for group in match.groups() if group is not None)
            found.setdefault(code, []).append(str(path.relative_to(REPO)))
    return found


def documented_codes() -> list[str]:
    """The codes docs/REASONS.md gives a section each (``### `code` ``)."""
    text = (REPO / "docs" / "REASONS.md").read_text(encoding="utf-8")
    return re.findall(r"^### `([a-z0-9-]+)`", text, flags=re.MULTILINE)


def test_every_code_in_the_source_is_listed_once_in_reasons():
    used = codes_in_source()
    assert len(used) >= 30, "the pattern finds the code sites"
    assert sorted(set(used) - set(CODES)) == []
    # A listed code nothing writes is a documented promise no run keeps.
    assert sorted(set(CODES) - set(used)) == []


def test_codes_are_kebab_case_with_a_summary():
    for code, summary in CODES.items():
        assert re.fullmatch(r"[a-z]+(-[a-z0-9]+)*", code), code
        assert summary and "\n" not in summary, code


def test_every_listed_code_is_documented_once():
    documented = documented_codes()
    assert sorted(documented) == sorted(CODES)
    assert len(documented) == len(set(documented))
    # Each section says what the pattern looks like and what a user can do.
    sections = re.split(r"^### ", (REPO / "docs" / "REASONS.md").read_text(encoding="utf-8"), flags=re.MULTILINE)[1:]
    for section in sections:
        code = section.split("`")[1]
        assert "Example:" in section and "What to do:" in section, code


def test_a_refusal_is_one_type_returned_or_raised():
    refusal = Refusal("uneven-split", "uneven split: 16,16,8 channels", ("conv0",))
    with pytest.raises(Refused) as raised:
        raise Refused(refusal)
    assert raised.value.refusal is refusal
    assert (raised.value.code, raised.value.reason, str(raised.value)) == \
        ("uneven-split", "uneven split: 16,16,8 channels", "uneven split: 16,16,8 channels")
    again = Refused("used-outside", "branch output y is used outside the Concat", ["conv1"])
    assert again.refusal == Refusal("used-outside", "branch output y is used outside the Concat", ("conv1",))
    with pytest.raises(TypeError):
        Refused("a reason without a code")
    with pytest.raises(AttributeError):
        refusal.code = "other"  # frozen: a code never changes on the way to the report
    assert refusal.with_reason("more words") == Refusal("uneven-split", "more words", ("conv0",))


def _branch(name, start, stop, kernel=3, out=4):
    import numpy as np

    weight = np.zeros((out, stop - start, kernel, kernel), np.float32)
    return Branch(name, start, stop, weight, None, 1, out, {"strides": (1, 1)})


@pytest.mark.parametrize("branches,channels,code", [
    ([_branch("a", 0, 4)], 4, "fewer-branches"),
    ([_branch("a", 0, 4), _branch("b", 4, 10)], 10, "uneven-split"),
    ([_branch("a", 0, 4), _branch("b", 4, 8, kernel=1)], 8, "kernel-mismatch"),
    ([_branch("a", 0, 4), _branch("b", 2, 6)], 6, "ranges-overlap"),
    ([_branch("a", 0, 4), _branch("b", 6, 10)], 10, "ranges-gap"),
    ([_branch("a", 4, 8), _branch("b", 0, 4)], 8, "out-of-order"),
    ([_branch("a", 0, 4), _branch("b", 4, 8)], 12, "partial-cover"),
    ([_branch("a", 0, 4), _branch("b", 4, 8)], None, "unknown-channels"),
    ([_branch("a", 0, 4), _branch("b", 4, 8, out=6)], 8, "out-channels-differ"),
])
def test_the_planner_refuses_with_the_code_of_its_sentence(branches, channels, code):
    refusal = plan_fusion(branches, channels, stack_axis=0)
    assert isinstance(refusal, Refusal) and refusal.code == code and refusal.reason


def test_a_chain_says_the_code_where_it_stops():
    first = [_branch("a", 0, 4), _branch("b", 4, 8)]
    later = [_branch("c", 0, 4), _branch("d", 0, 4, kernel=1)]

    def read_step(step, _channels):
        from gconv_rewrite.plan import ConvLayer

        return ConvLayer(first if step == 0 else later)

    plan = plan_chain([["Conv", "Conv"]] * 2, read_step, 8, conv_kinds=("Conv",), shared_input=False, stack_axis=0)
    assert plan.stopped.startswith("the convolution after (different kernel shapes")
    assert plan.stopped_code == "kernel-mismatch"
    plan = plan_chain([["Conv", "Relu"], ["Conv", "Sigmoid"]], read_step, 8, conv_kinds=("Conv",), shared_input=False,
                      stack_axis=0)
    assert (plan.stopped, plan.stopped_code) == ("where the branches differ (Relu vs Sigmoid)", "branches-differ")


def test_the_text_summary_shows_each_skip_code():
    report = Report(input="m.onnx", mode="fuse", skipped=[
        Skip("cat", "uneven split: 16,16,16,19 channels", ["c0"], code="uneven-split"),
        Skip("old", "a skip made before codes existed")])
    lines = format_summary(report).splitlines()
    assert "  cat: uneven split: 16,16,16,19 channels [uneven-split]" in lines
    assert "  old: a skip made before codes existed" in lines


def test_the_cli_report_carries_code_and_location(tmp_path):
    from click.testing import CliRunner

    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(cli_main, [str(REPO / "samples" / "near_miss_strides.onnx"), "--dry-run",
                                           "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    skipped = json.loads(report_path.read_text())["models"][0]["report"]["skipped"]
    assert len(skipped) == 1
    assert skipped[0]["code"] == "attribute-mismatch" and skipped[0]["location"]
    assert skipped[0]["reason"] == "different dilations between branches: (1,1) vs (2,2)"
    assert f"[{skipped[0]['code']}]" in result.output


# The near-miss tests of every format, run with a plugin that records each skip they produce.
NEAR_MISS_RUNS = [
    ["tests/test_fuse_split_conv.py", "tests/test_multi_node_tails.py", "tests/test_fuse_chains.py",
     "tests/test_onnx_constants.py", "tests/test_onnx_sound_reads.py", "tests/test_onnx_qdq.py",
     "tests/test_onnx_qlinear.py", "tests/test_expand_grouped_conv.py", "tests/test_concat_invariant.py"],
    ["tests/test_tf_chains.py", "tests/test_tf_tails.py", "tests/test_keras_chains.py", "tests/test_keras_expand.py",
     "-k", "near or miss or differ or refus or left or keep or stop or uneven or kernel or outside or late"],
]


def test_every_near_miss_skip_of_every_format_has_a_documented_code(tmp_path):
    log = tmp_path / "skips.jsonl"
    env = {**os.environ, "REASON_CODES_LOG": str(log), "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    for files in NEAR_MISS_RUNS:
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p",
                              "reason_codes_plugin", "-W", "ignore", *files], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=1200)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    skips = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(skips) > 100
    missing = [s for s in skips if s["code"] not in CODES]
    assert missing == [], missing[:5]
    documented = set(documented_codes())
    assert {s["code"] for s in skips} <= documented
    # Each format's near misses are among them (the test that made a skip names its file).
    for prefix in ("tests/test_fuse_split_conv.py", "tests/test_tf_", "tests/test_keras_"):
        assert any(s["test"].startswith(prefix) for s in skips), prefix
    # The common near misses are among them.
    assert {"uneven-split", "kernel-mismatch", "used-outside", "attribute-mismatch", "branches-differ",
            "tails-differ"} <= {s["code"] for s in skips}
