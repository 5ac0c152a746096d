"""What `--html` costs against the run it reviews, side by side (issue 25: "a small fraction").

A Split-form ResNeXt-50 (16 rewrites) fused with verification and a review page, several times;
the page's phase (``timings["html"]``) against the sum of the other phases of the same run.

    python benchmarks/html_cost.py [--image 224] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gconv_rewrite
from samples import models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "resnext50.onnx"
        onnx.save(models.resnext50("split", image=args.image), source)
        shares, pages, runs, sizes = [], [], [], []
        for n in range(args.rounds):
            page = Path(folder) / f"review{n}.html"
            result = gconv_rewrite.fuse(source, output=Path(folder) / f"out{n}.onnx", html=page)
            timings = dict(result.report.timings)
            writing = timings.pop("html")
            rest = sum(timings.values())
            shares.append(writing / rest)
            pages.append(writing)
            runs.append(rest)
            sizes.append(page.stat().st_size)
        print(f"ResNeXt-50 split, {args.image}x{args.image}, {len(result.report.rewrites)} rewrites, {args.rounds} runs: "
              f"page {statistics.median(pages):.3f} s against the run's {statistics.median(runs):.2f} s "
              f"(median share {100 * statistics.median(shares):.1f}%, range {100 * min(shares):.1f}-"
              f"{100 * max(shares):.1f}%); page size {max(sizes) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
