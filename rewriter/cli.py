"""The command line: ``gconv-rewrite MODEL [--fuse | --expand] ...``.

Only this module prints. Errors are one line on stderr with the exit code their type carries
(0 ok, 1 verification failed or --check found work, 2 bad input or usage); ``-v`` shows the
traceback as well.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow, when a format needs it, logs noisily

import click

from rewriter import __version__, formats
from rewriter.api import Options, rewrite
from rewriter.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, RewriteError, VerificationFailed
from rewriter.report import Report, format_summary, format_verification
from rewriter.verify import parse_shapes


def _write_report(path: Path, report: Report) -> None:
    with formats.atomic_output(path) as staging:
        (staging / path.name).write_text(json.dumps(report.to_dict(), indent=2) + "\n")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--fuse", "mode", flag_value="fuse", default=True,
              help="Fuse Split/Slice → N Conv → Concat into Conv(group=N) (default).")
@click.option("--expand", "mode", flag_value="expand",
              help="Expand Conv(group=N) into Split → N Conv → Concat.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output path (default: NAME.fused.onnx / NAME.expanded.onnx beside the input).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--check", is_flag=True,
              help="Write nothing; exit 1 if fusable patterns remain, 0 if none (for CI).")
@click.option("--dry-run", is_flag=True, help="List what would change; write nothing.")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write the run's report as JSON to this file.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run original and rewritten in onnxruntime and compare outputs.")
@click.option("--inputs", type=click.Path(path_type=Path),
              help="Verification inputs: a .npz with one array per model input.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=D0,D1,...",
              help="Shape for an input with dynamic dims, e.g. --shape x=1,3,224,224 (repeatable).")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Absolute tolerance.")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="Relative tolerance.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random verification inputs.")
@click.option("--keep-depthwise", is_flag=True,
              help="With --expand: leave depthwise convolutions (group == channels) alone.")
@click.option("--min-groups", type=click.IntRange(min=2), default=2, show_default=True,
              help="With --expand: expand only convolutions with at least this many groups.")
@click.option("--max-groups", type=click.IntRange(min=2), default=None,
              help="With --expand: expand only convolutions with at most this many groups.")
@click.option("--to", "to", type=click.Choice(["onnx", "savedmodel", "keras"]), default=None,
              help="Output format for SavedModel/Keras inputs (default: same as the input).")
@click.option("--signature", default="serving_default", show_default=True,
              help="SavedModel signature to rewrite.")
@click.option("--trust-lambdas", is_flag=True,
              help="Allow running the Python code of Keras Lambda layers in the model file (only for files you trust).")
@click.option("--repair-late-binding", is_flag=True,
              help="Rebuild late-bound Lambda slices with each branch's intended channels.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log details; show tracebacks on errors.")
@click.version_option(__version__, "--version", prog_name="gconv-rewrite")
def main(model, mode, output, force, check, dry_run, report_path, verify, inputs, shapes, atol, rtol, seed,
         keep_depthwise, min_groups, max_groups, to, signature, trust_lambdas, repair_late_binding, quiet, verbose):
    """Fuse hand-made grouped convolutions in MODEL into native grouped convolutions (or expand
    them), verify that the outputs did not change, and write the result."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s")
    echo = (lambda *a, **k: None) if quiet else click.echo
    report = None
    try:
        if check and dry_run:
            raise click.UsageError("--check and --dry-run are exclusive")
        if atol < 0 or rtol < 0:
            raise click.UsageError("--atol and --rtol must be non-negative")
        find_only = check or dry_run
        out = None
        if not find_only:
            out = output or formats.default_output(model, mode, to)
        if max_groups is not None and max_groups < min_groups:
            raise click.UsageError("--max-groups must be at least --min-groups")
        options = Options(verify=verify, atol=atol, rtol=rtol, seed=seed, shapes=parse_shapes(shapes),
                          inputs=inputs, force=force, keep_depthwise=keep_depthwise, min_groups=min_groups,
                          max_groups=max_groups, to=to, signature=signature, trust_lambdas=trust_lambdas,
                          repair_late_binding=repair_late_binding)
        if mode == "expand":
            _require_expand()
        try:
            result = rewrite(model, mode=mode, output=out, apply=not find_only, options=options)
        except VerificationFailed as failure:
            if failure.verification is not None and not quiet:
                click.echo("\n".join(format_verification(failure.verification)))
            raise
        report = result.report
        if check:
            echo(format_summary(report))
            found = len(report.rewrites)
            echo(f"check: {found} fusable pattern{'s' if found != 1 else ''} found" if mode == "fuse"
                 else f"check: {found} expandable convolution{'s' if found != 1 else ''} found")
            code = EXIT_FAILED if found else EXIT_OK
        elif dry_run:
            echo(format_summary(report))
            echo("dry run: nothing written")
            code = EXIT_OK
        else:
            echo(format_summary(report))
            code = EXIT_OK
        if report_path is not None:
            _write_report(report_path, report)
        sys.exit(code)
    except click.UsageError:
        raise
    except RewriteError as error:
        if verbose:
            raise
        click.echo(f"gconv-rewrite: error: {error.message}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        click.echo("gconv-rewrite: interrupted; nothing was written", err=True)
        sys.exit(130)
    except Exception as error:  # a bug: one line unless the user asked for the traceback
        if verbose:
            raise
        click.echo(f"gconv-rewrite: internal error: {type(error).__name__}: {error} (run with -v for the traceback)",
                   err=True)
        sys.exit(EXIT_BAD_INPUT)


def _require_expand() -> None:
    try:
        from passes.onnx import ExpandGroupedConvPass  # noqa: F401
    except ImportError:
        raise RewriteError("--expand is not available yet in this version") from None
