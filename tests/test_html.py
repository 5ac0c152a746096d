"""--html: the review page, checked the way a person sees it.

Each test runs the tool on a small model built in code, checks the rewrite itself (structure and
numbers: onnxruntime or the run's own verification, original against rewritten), then renders the
page in headless Chromium (Debian's ``chromium``; ``.ci/run`` installs it) and reads the rendered
DOM: every rewrite's location, one inline ``<svg>`` drawing per rewrite, no element that fetches
anything (no ``src``/``href`` to ``http`` or ``//``), no script, no element made from a model's name.
A screenshot of each page is saved into ``$GCONV_ARTIFACTS`` (a CI artifact) or the test's tmp folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from gconv_rewrite import expand, fuse
from gconv_rewrite.cli import main
from samples import models
from tests.conftest import assert_same_outputs

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS = "<img src=x onerror=alert(1)>"


def chromium() -> str:
    """Debian's chromium; its absence fails the test (CI installs it), never skips it silently."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("headless Chromium is needed to check the --html page as a reviewer sees it: install Debian's "
                    "chromium (apt-get install -y --no-install-recommends chromium; .ci/run does)")
    return found


def render(page: Path, tmp_path: Path, shot: str) -> str:
    """The page's DOM after Chromium rendered it; a screenshot of it saved as ``shot``."""
    profile = tmp_path / f"chromium-profile-{shot}"
    base = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True)
    artifacts = Path(os.environ.get("GCONV_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    png = artifacts / f"{shot}.png"
    subprocess.run([*base, f"--screenshot={png}", "--window-size=1280,2000", page.as_uri()], capture_output=True,
                   timeout=120, check=True)
    assert png.stat().st_size > 10_000, "the screenshot is empty"
    return dom.stdout


class Elements(HTMLParser):
    """Every element of a DOM (tag, attributes) and its text."""

    def __init__(self, dom: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def tags(self, tag: str, cls: str | None = None) -> list[dict]:
        return [a for t, a in self.elements if t == tag and (cls is None or cls in (a.get("class") or "").split())]


def assert_reviewable(dom: str, locations: list[str]) -> Elements:
    """What a reviewer must see, and what the page must never do."""
    page = Elements(dom)
    text = "".join(page.text)
    assert len(page.tags("svg", "drawing")) == len(locations), "one drawing per rewrite"
    for location in locations:
        assert location in text, f"rewrite {location} is not on the page"
    for tag, attrs in page.elements:
        assert tag not in ("script", "img", "iframe", "object", "embed", "link"), f"<{tag}> on the page"
        for name, value in attrs.items():
            assert not name.startswith("on"), f"<{tag} {name}=...>"
            if name in ("src", "href") and value:
                assert not value.startswith(("http", "//")), f"network reference {value}"
    return page


def test_grouped_split_cli(tmp_path):
    """The issue's command: `gconv-rewrite samples/grouped_split.onnx --fuse --html review.html`."""
    fused, page = tmp_path / "fused.onnx", tmp_path / "review.html"
    result = CliRunner().invoke(main, [str(REPO / "samples/grouped_split.onnx"), "--fuse", "-o", str(fused),
                                       "--html", str(page)])
    assert result.exit_code == 0, result.output
    assert f"review page: {page}" in result.output
    assert [n.op_type for n in onnx.load(str(fused)).graph.node].count("Conv") == 1
    assert_same_outputs(REPO / "samples/grouped_split.onnx", fused)
    page_dom = assert_reviewable(render(page, tmp_path, "grouped_split"), ["Conv_5_group8"])
    text = "".join(page_dom.text)
    assert "verified" in text and "Split_2" in text and "Concat_27" in text and "… 5 more" in text
    # No replace without --force; with it, the page is rewritten.
    again = CliRunner().invoke(main, [str(REPO / "samples/grouped_split.onnx"), "-o", str(tmp_path / "f2.onnx"),
                                      "--html", str(page)])
    assert again.exit_code == 2 and "already exists (use --force to overwrite)" in again.output
    assert not (tmp_path / "f2.onnx").exists()


def test_resnext50_split_page_small_and_quick(tmp_path):
    """A Split-form ResNeXt-50: 16 rewrites, 16 drawings, well under 1 MB. (What writing the page costs
    against the run is measured in benchmarks/html_cost.py, not asserted here.)"""
    source, page = tmp_path / "resnext50.onnx", tmp_path / "resnext50.html"
    onnx.save(models.resnext50("split", image=64), source)
    result = fuse(source, output=tmp_path / "resnext50.fused.onnx", html=page)
    assert len(result.report.rewrites) == 16
    groups = [a.i for n in onnx.load(str(tmp_path / "resnext50.fused.onnx")).graph.node if n.op_type == "Conv"
              for a in n.attribute if a.name == "group"]
    assert groups.count(32) == 16
    assert result.report.verification.passed and all(b["passed"] for r in result.report.rewrites
                                                      for b in r.boundary)
    assert page.stat().st_size < 200_000, page.stat().st_size
    assert "html" in result.report.timings  # the page's own phase, which the benchmark reads
    dom = render(page, tmp_path, "resnext50_split")
    assert_reviewable(dom, [r.location for r in result.report.rewrites])
    assert "… 29 more" in dom and "Conv group=32" in dom


def test_expand_page(tmp_path):
    """--expand: the grouped conv drawn before, its Split → N Conv → Concat after."""
    source, page = tmp_path / "native.onnx", tmp_path / "expand.html"
    onnx.save(models.grouped_block("native", groups=8, channels=32, out_channels=32), source)
    output = tmp_path / "native.expanded.onnx"
    result = expand(source, output=output, html=page)
    assert [r.groups for r in result.report.rewrites] == [8]
    assert [n.op_type for n in onnx.load(str(output)).graph.node].count("Conv") == 8
    assert_same_outputs(source, output)
    dom = render(page, tmp_path, "expand")
    assert_reviewable(dom, [result.report.rewrites[0].location])
    assert "Conv group=8" in dom and "Split" in dom and "… 5 more" in dom


def test_legacy_lambda_keras_h5_page(tmp_path):
    """A legacy Lambda ResNeXt .h5 (tf-keras): one drawing per grouped conv, layer names and kinds."""
    from samples import keras_models

    source = keras_models.resnext50_lambda_model(tmp_path / "resnext_lambda.h5", size=32)
    page = tmp_path / "keras.html"
    result = CliRunner().invoke(main, [str(source), "--trust-lambdas", "--html", str(page), "--format", "json"])
    assert result.exit_code == 0, result.output
    import json

    report = json.loads(result.output)["models"][0]["report"]
    assert len(report["rewrites"]) == 16 and report["verification"]["passed"]
    assert all(b["passed"] for r in report["rewrites"] for b in r["boundary"])  # each group at its own tensor
    dom = render(page, tmp_path, "keras_lambda")
    assert_reviewable(dom, [r["location"] for r in report["rewrites"]])
    assert "Lambda" in dom and "s1b1_2_slice0" in dom and "Conv2D group=32" in dom


def _hostile_model() -> onnx.ModelProto:
    """grouped_split's pattern with a node, a tensor and an output named as markup."""
    rng = np.random.default_rng(0)
    weights = [helper.make_tensor(f"w{i}", TensorProto.FLOAT, [2, 2, 3, 3], rng.standard_normal(36).tolist())
               for i in range(2)]
    nodes = [helper.make_node("Split", ["x"], ["s0", XSS], axis=1, num_outputs=2, name=XSS),
             helper.make_node("Conv", ["s0", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
             helper.make_node("Conv", [XSS, "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1\"><script>x</script>"),
             helper.make_node("Concat", ["c0", "c1"], [XSS + "out"], axis=1, name="concat")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info(XSS + "out", TensorProto.FLOAT, [1, 4, 6, 6])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_model_names_stay_text(tmp_path):
    source, page = tmp_path / "hostile.onnx", tmp_path / "hostile.html"
    onnx.save(_hostile_model(), source)
    result = fuse(source, output=tmp_path / "hostile.fused.onnx", html=page)
    assert len(result.report.rewrites) == 1
    assert_same_outputs(source, tmp_path / "hostile.fused.onnx")
    written = page.read_text()
    assert "<img" not in written and "<script>" not in written and "&lt;img src=x onerror=alert(1)&gt;" in written
    parsed = assert_reviewable(render(page, tmp_path, "hostile"), [result.report.rewrites[0].location])
    assert XSS + "out" in "".join(parsed.text)  # the name is shown, as text


def test_batch_index_links_a_page_per_model(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(models.grouped_block("split", groups=4), folder / "a.onnx")
    onnx.save(models.grouped_block("native", groups=4), folder / "b.onnx")
    (folder / "broken.onnx").write_bytes(b"not a model")
    index = tmp_path / "review.html"
    result = CliRunner().invoke(main, [str(folder), "-o", str(tmp_path / "out"), "--jobs", "2", "--html", str(index)])
    assert result.exit_code == 2, result.output  # the broken model's row
    assert_same_outputs(folder / "a.onnx", tmp_path / "out" / "a.onnx")
    dom = render(index, tmp_path, "batch_index")
    links = [a["href"] for a in Elements(dom).tags("a")]
    assert links == ["review-001-a.onnx.html", "review-002-b.onnx.html", "review-003-broken.onnx.html"]
    assert_reviewable(dom, [])
    assert len(Elements((tmp_path / links[0]).read_text()).tags("svg", "drawing")) == 1
    assert len(Elements((tmp_path / links[1]).read_text()).tags("svg", "drawing")) == 0  # unchanged
    assert "not written:" in (tmp_path / links[2]).read_text()


def test_bad_page_paths_are_one_line(tmp_path):
    source = tmp_path / "m.onnx"
    onnx.save(models.grouped_block("split", groups=4), source)
    cases = {str(source): "the input reads this file", str(tmp_path / "no" / "p.html"): "does not exist",
             str(tmp_path / "m.fused.onnx"): "also a model output"}
    for page, words in cases.items():
        result = CliRunner().invoke(main, [str(source), "--html", page])
        assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "m.fused.onnx").exists()
    config = tmp_path / "gconv.toml"
    config.write_text('html = "../outside.html"\n')
    result = CliRunner().invoke(main, [str(source), "--config", str(config)])
    assert result.exit_code == 2 and "leads outside the config's folder" in result.output


def test_target_decisions_and_the_benchmark_chart(tmp_path):
    """--target's decisions grouped by rule, and --benchmark's bars (before/after) with their numbers."""
    source = tmp_path / "block.onnx"
    onnx.save(models.grouped_block("split", groups=4, channels=16, out_channels=16), source)
    page = tmp_path / "target.html"
    result = CliRunner().invoke(main, [str(source), "--target", "onnxruntime-cpu", "--benchmark", "--threads", "1",
                                       "-o", str(tmp_path / "out.onnx"), "--html", str(page)])
    assert result.exit_code == 0, result.output
    assert_same_outputs(source, tmp_path / "out.onnx")
    dom = render(page, tmp_path, "target_benchmark")
    elements = assert_reviewable(dom, [line.split(":")[0].strip() for line in result.output.splitlines()
                                       if "fuse-split-conv" in line])
    text = " ".join(elements.text)
    assert "Target onnxruntime-cpu" in text and "because" in text
    chart = [a for a in elements.tags("svg") if a.get("aria-label") == "benchmark"]
    assert len(chart) == 1 and len(elements.tags("rect", "bar")) == 2
    assert " ms" in text
