"""The command line: ``gconv-rewrite MODEL... [--fuse | --expand] ...``.

Only this module prints. Errors are one line on stderr with the exit code their type carries
(0 ok, 1 verification failed or --check found work, 2 bad input or usage); ``-v`` shows the
traceback as well. With ``--format json`` stdout holds one JSON document and nothing else (a
usage error too: the envelope of gconv_rewrite.envelope, docs/JSON.md); progress and logs go to
stderr (gconv_rewrite.progress). ``--check`` prints like a linter (gconv_rewrite.lint).
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import json
import logging
import signal
import sys
import tempfile
from pathlib import Path

import click

from gconv_rewrite import __version__, batch, config, envelope, formats, html, lint, quiet, targets, workers
from gconv_rewrite import progress as progress_lines
from gconv_rewrite.api import Options
from gconv_rewrite.errors import EXIT_BAD_INPUT, BadInput, OutputError, RewriteError
from gconv_rewrite.verify import parse_shapes

quiet.quiet_environment()  # TensorFlow, when a format needs it: set before any worker is spawned

# What a console that is not UTF-8 (cp1252 on Windows, LANG=C) cannot show, said in ASCII
# instead of a UnicodeEncodeError: the help's arrows, the summaries' ellipses and dashes.
_ASCII_FOR = {"→": "->", "←": "<-", "…": "...", "—": "--", "–": "-", "×": "x", "≤": "<=", "≥": ">=", "±": "+/-"}


def _ascii_fallback(error: UnicodeEncodeError) -> tuple[str, int]:
    text = error.object[error.start:error.end]
    return "".join(_ASCII_FOR.get(c, "?") for c in text), error.end


def survive_console() -> None:
    """Make stdout and stderr write what their encoding cannot hold as ASCII (``_ASCII_FOR``, else
    ``?``) instead of crashing; streams that are UTF-8 are left as they are."""
    codecs.register_error("gconv-ascii", _ascii_fallback)
    for stream in (sys.stdout, sys.stderr):
        try:
            utf = codecs.lookup(getattr(stream, "encoding", None) or "utf-8").name.startswith("utf")
        except LookupError:
            utf = False
        if not utf:
            try:
                stream.reconfigure(errors="gconv-ascii")
            except (AttributeError, ValueError, OSError):  # not a TextIOWrapper (a test's capture): left alone
                pass


survive_console()  # before click prints anything, --help included


_CONFIG_PATH = "gconv-rewrite.config"  # ctx.meta: the config file read (None: none)
_SHOW_CONFIG = "gconv-rewrite.show-config"


class _Command(click.Command):
    """The command, with its configuration read before the flags are parsed: the config file is
    found from the models named (``config.find``), which click knows only after parsing."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["gconv_json"] = _json_asked(args)
        try:
            return self._parse_with_config(ctx, args)
        except click.UsageError as error:  # under --format json, answered as a JSON envelope too
            _usage_json(ctx, error)
            raise

    def _parse_with_config(self, ctx: click.Context, args: list[str]) -> list[str]:
        flags = set(args[: args.index("--")] if "--" in args else args)  # after "--": file names
        if {"--fuse", "--expand"} <= flags:  # click would keep the last one, silently
            raise click.UsageError("--fuse and --expand are exclusive; give one", ctx)
        if not {"-h", "--help", "--version", "--list-targets"} & flags:  # these answer without a config
            # A first, raw pass (no types, no callbacks) for the config's path and the models.
            raw, _, _ = self.make_parser(ctx).parse_args(args=list(args))
            _load_config(ctx, raw.get("config"), tuple(Path(p) for p in raw.get("models") or ()))
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        if ctx.meta.get(_SHOW_CONFIG):
            click.echo(_settings_in_force(ctx))
            ctx.exit(0)
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            _usage_json(ctx, error)
            raise


def _load_config(ctx: click.Context, given: str | None, models: tuple[Path, ...]) -> None:
    """Defaults from ``--config FILE`` or the nearest pyproject.toml's [tool.gconv-rewrite]; flags
    win. A config that cannot be used is one line and exit 2, like every other bad input."""
    try:
        path, defaults = config.load(ctx, Path(given) if given is not None else None, models)
    except RewriteError as error:
        if ctx.meta.get("gconv_json"):
            document = envelope.document([], EXIT_BAD_INPUT, error={"kind": envelope.error_kind(error),
                                                                    "message": error.message})
            click.echo(json.dumps(document, indent=2))
        click.echo(f"gconv-rewrite: error: {error.message}", err=True)
        ctx.exit(EXIT_BAD_INPUT)
    ctx.meta[_CONFIG_PATH] = path
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


def _settings_in_force(ctx: click.Context) -> str:
    """--show-config: every setting's value and where it came from (default, the config file, the
    command line), one per line, as a config file names them."""
    origin = {click.core.ParameterSource.COMMANDLINE: "command line",
              click.core.ParameterSource.DEFAULT_MAP: formats.shown(ctx.meta.get(_CONFIG_PATH) or "config"),
              click.core.ParameterSource.ENVIRONMENT: "environment"}
    found = ctx.meta.get(_CONFIG_PATH)
    lines = [f"config file: {formats.shown(found) if found else 'none'}"]
    shown_names = set()
    for param in ctx.command.params:
        if param.name in config.NOT_SETTINGS or param.name not in ctx.params or param.name in shown_names:
            continue
        shown_names.add(param.name)  # --fuse and --expand set one value: the mode
        value = ctx.params[param.name]
        value = list(value) if isinstance(value, tuple) else str(value) if isinstance(value, Path) else value
        key = "mode" if param.name == "mode" else next(o[2:] for o in param.opts if o.startswith("--"))
        source = origin.get(ctx.get_parameter_source(param.name), "default")
        lines.append(f"{key} = {json.dumps(value)}  # {source}")
    return "\n".join(lines)


def _show_config(ctx: click.Context, _param, value: bool) -> None:
    ctx.meta[_SHOW_CONFIG] = value


def _list_targets(ctx: click.Context, param, value: bool):
    """--list-targets: print the table (or, under --format json, the JSON) and exit, with no model
    needed (eager, like --version)."""
    if value and ctx.get_parameter_source(param.name) == click.core.ParameterSource.COMMANDLINE:
        if ctx.meta.get("gconv_json"):
            rows = [{"name": t.name, "native_when": t.native_when, "runtime": t.runtime, "evidence": t.evidence}
                    for t in targets.TARGETS.values()]
            click.echo(json.dumps(envelope.targets_document(rows), indent=2))
        else:
            click.echo(targets.format_table())
        ctx.exit(0)


def _json_asked(args) -> bool:
    """Whether the raw command line asks for ``--format json`` (read before click parses it, so
    that a usage error can still answer in JSON)."""
    args = list(args)
    pairs = zip(args, args[1:])
    return "--format=json" in args or any(a == "--format" and b == "json" for a, b in pairs)


def _usage_json(ctx: click.Context, error: click.UsageError) -> None:
    if ctx.meta.get("gconv_json") or ctx.params.get("output_format") == "json":  # the flag, or a config's format
        document = envelope.document([], error.exit_code, error={"kind": envelope.USAGE, "message": error.format_message()})
        click.echo(json.dumps(document, indent=2))


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--config", type=click.Path(path_type=Path), expose_value=False,
              help="TOML file of defaults (default: the nearest pyproject.toml with [tool.gconv-rewrite], "
                   "searched upward from the first model to the repository's root, else ./pyproject.toml); "
                   "flags win.")
@click.option("--show-config", is_flag=True, expose_value=False, callback=_show_config,
              help="Print the settings in force for MODEL and where each came from (default, the config "
                   "file, the command line), then exit.")
@click.option("--fuse", "mode", flag_value="fuse", default=True,
              help="Fuse Split/Slice → N Conv → Concat into Conv(group=N) (default).")
@click.option("--expand", "mode", flag_value="expand",
              help="Expand Conv(group=N) into Split → N Conv → Concat.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output path (default: NAME.fused.onnx / NAME.expanded.onnx beside the input); "
                   "with several models or a folder: the folder to mirror outputs into.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--check", is_flag=True,
              help="Write nothing; exit 1 if fusable patterns remain, 0 if none (for CI).")
@click.option("--dry-run", is_flag=True, help="List what would change; write nothing.")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write the run's report as JSON to this file ('-': to stdout, the text summary then going to "
                   "stderr). A symlink is written through (its target replaced, the link kept).")
@click.option("--html", "html_path", type=click.Path(path_type=Path),
              help="Write a review page (self-contained HTML: each rewrite drawn before and after, the "
                   "verification, the near misses) to this file; for several models, an index page linking "
                   "one page per model (INDEX-NNN-MODEL.html beside it).")
@click.option("--format", "output_format", type=click.Choice(["text", "json", "github"]), default="text",
              show_default=True,
              help="stdout: human summary, one JSON document (docs/JSON.md; logs and progress go to stderr), or "
                   "GitHub workflow annotations (::error for findings, ::warning for near misses).")
@click.option("--progress", "progress_choice", type=click.Choice(["auto", "always", "never"]), default="auto",
              show_default=True,
              help="Progress on stderr, in whole lines: each phase of a slow model as it starts; one line per "
                   "finished model with a done count and ETA. auto: on, but off under --format json when stderr "
                   "is not a terminal, and under -q.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Process several models in this many worker processes.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run original and rewritten and compare outputs.")
@click.option("--inputs", type=click.Path(path_type=Path),
              help="Verification inputs: a .npz with one array per model input.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=D0,D1,...",
              help="Shape for an input with dynamic dims, e.g. --shape x=1,3,224,224 (repeatable).")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Absolute tolerance.")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="Relative tolerance.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random verification inputs.")
@click.option("--fold-bn/--no-fold-bn", default=True, show_default=True,
              help="With --fuse: fold a BatchNormalization (or per-channel Mul/Add) that reads only a fused "
                   "conv into its weights, as a native export would.")
@click.option("--keep-depthwise", is_flag=True,
              help="With --expand: leave depthwise convolutions (group == channels) alone.")
@click.option("--min-groups", type=click.IntRange(min=2), default=2, show_default=True,
              help="With --expand: expand only convolutions with at least this many groups.")
@click.option("--max-groups", type=click.IntRange(min=2), default=None,
              help="With --expand: expand only convolutions with at most this many groups.")
@click.option("--target", metavar="NAME", default=None,
              help="Deployment target (ONNX, SavedModel, Keras): fuse the grouped convs it runs natively, expand "
                   f"those it does not. One of: {', '.join(targets.names())}.")
@click.option("--auto", is_flag=True,
              help="ONNX: time both forms of every grouped conv on onnxruntime (its real shapes, --threads) and "
                   "keep each in the faster one (native on a tie); verified; not with --target.")
@click.option("--benchmark", is_flag=True,
              help="Time the original and the written model on the output format's runtime (5 fresh sessions "
                   "per model, interleaved; median, spread, before/after ratio with its 95% interval and a "
                   "verdict) into the summary and report.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads of the runtime --benchmark and --auto time on (default: the runtime's).")
@click.option("--list-targets", is_flag=True, is_eager=True, expose_value=False, callback=_list_targets,
              help="Print the targets and what each wants per grouped conv, then exit.")
@click.option("--to", "to", type=click.Choice(formats.output_formats()), default=None,
              help="Output format for SavedModel/Keras inputs (default: same as the input); savedmodel "
                   "from Keras: exported, frozen, verified in TF, NAME.fused/; tflite: "
                   "TensorFlow's converter, verified in the TFLite interpreter, NAME.tflite.")
@click.option("--signature", default="serving_default", show_default=True,
              help="SavedModel signature to rewrite.")
@click.option("--trust-lambdas", is_flag=True,
              help="Allow running the Python code of Keras Lambda layers in the model file (only for files you trust).")
@click.option("--repair-late-binding", is_flag=True,
              help="Rebuild late-bound Lambda slices with each branch's intended channels.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors and findings.")
@click.option("-v", "--verbose", is_flag=True, help="Log details; show tracebacks on errors.")
@click.version_option(__version__, "--version", prog_name="gconv-rewrite")
def main(models, mode, output, force, check, dry_run, report_path, html_path, output_format, jobs, verify, inputs, shapes,
         atol, rtol, seed, fold_bn, keep_depthwise, min_groups, max_groups, target, auto, benchmark, threads, to,
         signature, trust_lambdas, repair_late_binding, quiet, verbose, progress_choice):
    """Fuse hand-made grouped convolutions in MODEL(s) into native grouped convolutions (or expand
    them), verify that the outputs did not change, and write the result. A folder is walked for
    {suffixes} files and SavedModel directories."""
    _configure_logging(verbose)
    if check or dry_run:
        report_path = _report_asked(report_path)
        html_path = _report_asked(html_path, "html_path")
    as_json, report_to_stdout = output_format == "json", str(report_path) == "-"
    _check_usage(check=check, dry_run=dry_run, atol=atol, rtol=rtol, min_groups=min_groups, max_groups=max_groups,
                 target=target, auto=auto, benchmark=benchmark, two_documents=as_json and report_to_stdout)
    say = (lambda *a, **k: None) if quiet or output_format != "text" else functools.partial(click.echo, err=report_to_stdout)
    try:
        if target is not None:
            targets.get(target)  # an unknown name: one line listing the known ones
        options = Options(verify=verify, atol=atol, rtol=rtol, seed=seed, shapes=parse_shapes(shapes),
                          inputs=inputs, force=force, keep_depthwise=keep_depthwise, min_groups=min_groups,
                          max_groups=max_groups, to=to, signature=signature, trust_lambdas=trust_lambdas,
                          repair_late_binding=repair_late_binding, fold_bn=fold_bn, target=target, auto=auto,
                          benchmark=benchmark, threads=threads)
        if auto and not verify:  # before any model is read: one line, exit 2
            raise RewriteError("--auto needs verification (it applies forms chosen by timing, then proves the "
                               "model): drop --no-verify")
        many = batch.is_batch(models)
        job_list = _plan_jobs(models, output, many=many, mode=mode, to=to, write=not (check or dry_run),
                              target=target, auto=auto)
        report_protected = _check_report_path(report_path, job_list, inputs)
        html_pages = _check_html_path(html_path, job_list, inputs, report_path, force=force, many=many)
        _warn_inapplicable(job_list, quiet=quiet)
    except RewriteError as error:
        _fail(error, verbose, as_json=as_json)

    show = progress_lines.enabled(progress_choice, tty=sys.stderr.isatty(), quiet=quiet, as_json=as_json)
    if show and jobs == 1 and (not many or sys.stderr.isatty()):
        options = dataclasses.replace(options, progress=progress_lines.Phases(lambda line: click.echo(line, err=True)))
    results = _run_jobs(job_list, processes=jobs, show_each=show and many, mode=mode, check=check,
                        dry_run=dry_run, options=options, verbose=verbose)
    code = batch.worst([r.exit_code for r in results])

    if report_path is not None:
        _write_report(report_path, report_protected, results, code, verbose=verbose, as_json=as_json)
    if html_path is not None:
        _write_html(html_path, html_pages, results, code, mode=mode, force=force, verbose=verbose, as_json=as_json)
    fix = lint.fix_command(models, _fix_flags(mode=mode, target=target, auto=auto, trust_lambdas=trust_lambdas,
                                              repair_late_binding=repair_late_binding))
    _print_results(results, code, output_format=output_format, many=many, quiet=quiet, say=say, mode=mode,
                   check=check, dry_run=dry_run, per_node=target is not None or auto, fix=fix)
    if html_path is not None:
        say(f"review page: {formats.shown(html_path)}")
    sys.exit(code)


def _fix_flags(*, mode: str, target: str | None, auto: bool, trust_lambdas: bool,
               repair_late_binding: bool) -> list[str]:
    """The flags of the command that applies what --check found: the same choice of forms."""
    flags = ["--target", target] if target is not None else ["--auto"] if auto else [f"--{mode}"]
    return flags + ["--trust-lambdas"] * trust_lambdas + ["--repair-late-binding"] * repair_late_binding


def _print_results(results: list[batch.JobResult], code: int, *, output_format: str, many: bool, quiet: bool,
                   say, mode: str, check: bool, dry_run: bool, per_node: bool, fix: str) -> None:
    """stdout: the JSON document, the GitHub annotations, or the text (linter lines for findings
    and near misses, which -q keeps; the summary or table; the footer)."""
    if output_format == "json":  # (JSON escapes control characters itself)
        click.echo(json.dumps(envelope.document(results, code), indent=2))
        return
    findings = [f for r in results for f in lint.model_findings(r, check=check or dry_run)]
    failed_alone = not many and results[0].error is not None  # one model: its one-line error says it all
    footer = lint.footer(results, mode=mode, check=check, fix=fix) if (check or dry_run) and not failed_alone \
        else None
    if output_format == "github":
        for finding in findings:
            click.echo(lint.github_line(finding))
        if failed_alone:
            click.echo(f"gconv-rewrite: error: {formats.shown(results[0].error)}", err=True)
        if footer is not None and not quiet:
            click.echo(footer)
        return
    printable = [_printable(r) for r in results]
    if many:
        _print_batch(printable, findings, code, quiet=quiet, say=say, check=check)
    else:
        (result,) = printable
        _print_single(result, findings, quiet=quiet, say=say, mode=mode, check=check, dry_run=dry_run,
                      per_node=per_node)
    if footer is not None:
        say(footer)
    if not many and results[0].error is None:
        _print_findings(printable[0], say=say, check=check)
# The help names the suffixes a folder walk picks up, from the format table.
main.help = main.help.replace("{suffixes}", formats.suffixes_shown())


def _configure_logging(verbose: bool) -> None:
    """Logs go to stderr (stdout may hold the one JSON document); debug level only with -v."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    if not verbose:  # onnx-ir warns about every oddity of a broken file; our error says it once
        logging.getLogger("onnx_ir").setLevel(logging.ERROR)


def _mode_given() -> bool:
    """Whether --fuse / --expand was on the command line (not the default, not a config file)."""
    return click.get_current_context().get_parameter_source("mode") == click.core.ParameterSource.COMMANDLINE


def _check_usage(*, check: bool, dry_run: bool, atol: float, rtol: float, min_groups: int, max_groups: int | None,
                 target: str | None, auto: bool, benchmark: bool, two_documents: bool = False) -> None:
    """Flag combinations that make no sense: a usage error (exit 2) before any model is read."""
    if check and dry_run:
        raise click.UsageError("--check and --dry-run are exclusive")
    if two_documents:
        raise click.UsageError("--report - and --format json both write one JSON document to stdout; give one")
    if atol < 0 or rtol < 0:
        raise click.UsageError("--atol and --rtol must be non-negative")
    if max_groups is not None and max_groups < min_groups:
        raise click.UsageError("--max-groups must be at least --min-groups")
    if target is not None and _mode_given():
        raise click.UsageError("--target chooses fuse or expand per node; drop --fuse / --expand")
    if auto and target is not None:
        raise click.UsageError("--auto is a measured target: give --auto or --target, not both")
    if auto and _mode_given():
        raise click.UsageError("--auto chooses fuse or expand per node; drop --fuse / --expand")
    if benchmark and (check or dry_run):
        raise click.UsageError("--benchmark times the written model; not with --check / --dry-run")


def _inapplicable(params: dict, input_formats: set[str]) -> dict[str, str]:
    """Parameter name → why it does nothing in this run, for every option that does nothing here."""
    per_node = params["target"] is not None or params["auto"]
    fusing, expanding = params["mode"] == "fuse" and not per_node, params["mode"] == "expand" and not per_node
    why = {}
    for name in ("keep_depthwise", "min_groups", "max_groups"):
        if fusing:
            why[name] = "it applies with --expand only"
    if expanding:
        why["fold_bn"] = "it applies with --fuse only"
    if "savedmodel" not in input_formats and params["to"] not in ("savedmodel", "tflite"):
        why["signature"] = "it applies to SavedModel inputs (and --to savedmodel / tflite) only"
    if not (params["benchmark"] or params["auto"]):
        why["threads"] = "it sets the threads --benchmark and --auto time with, and neither is given"
    if not params["verify"]:
        for name in ("atol", "rtol", "seed"):
            why[name] = "--no-verify turns the verification off"
    if "keras" not in input_formats:
        for name in ("trust_lambdas", "repair_late_binding"):
            why[name] = "it applies to Keras inputs only"
    if params["check"] or params["dry_run"]:
        why["force"] = "--check and --dry-run write nothing"
    return why


def _warn_inapplicable(job_list: list[batch.Job], *, quiet: bool) -> None:
    """One warning on stderr per option given (on the command line or in the config) that does
    nothing in this run: an option silently ignored reads as one that worked."""
    ctx = click.get_current_context()
    given = {click.core.ParameterSource.COMMANDLINE: "", click.core.ParameterSource.DEFAULT_MAP:
             f" (set in {formats.shown(ctx.meta.get(_CONFIG_PATH) or 'the config')})"}
    input_formats = set()
    for job in job_list:
        try:
            input_formats.add(formats.detect_format(job.input))
        except BadInput:
            pass  # its own error comes when the run reads it
    options = {p.name: p for p in ctx.command.params if isinstance(p, click.Option)}
    for name, why in _inapplicable(ctx.params, input_formats).items():
        source, value, option = ctx.get_parameter_source(name), ctx.params[name], options[name]
        if source not in given or quiet or (value in (False, None) and not option.secondary_opts):
            continue  # not given, or given as "off" (``keep-depthwise = false``): nothing to ignore
        flag = option.secondary_opts[0] if value is False and option.secondary_opts else option.opts[-1]
        click.echo(f"gconv-rewrite: warning: {flag}{given[source]} ignored: {why}", err=True)


def _check_model_paths(models, output: Path | None) -> None:
    """Habits of other tools, answered before anything runs: ``-`` for stdin, and onnxsim's
    ``TOOL IN OUT`` (a second path that does not exist and is named like an output)."""
    if any(str(model) == "-" for model in models):
        raise BadInput("-: models are read from files (standard input is not supported); pass the model's path")
    last = models[-1] if len(models) == 2 else None
    written = {f.write_suffix for f in formats.FORMATS} | set(formats.model_suffixes())
    if last is not None and output is None and models[0].exists() and not last.exists() \
            and last.suffix.lower() in written - {""}:
        raise BadInput(f"{formats.shown(last)}: no such model; to write the output there, "
                       f"pass it with -o: gconv-rewrite {formats.shown(models[0])} -o {formats.shown(last)}")


def _plan_jobs(models, output: Path | None, *, many: bool, mode: str, to: str | None, write: bool,
               target: str | None, auto: bool) -> list[batch.Job]:
    """The jobs of this run, each with the output it writes (None: writes nothing)."""
    _check_model_paths(models, output)
    if many and output is not None and output.exists() and not output.is_dir():
        raise RewriteError(f"{output}: with several models, -o names a folder")
    job_list = batch.plan_jobs(models, output if many else None, mode=mode, to=to, write=write)
    if target is not None or auto:  # NAME.TARGET.onnx beside the input: it may hold fused and expanded convs
        for job in job_list:
            if job.output is not None and not job.mirrored:
                job.output = _target_output(job.input, target or "auto", to)
    if not many and output is not None and write:
        job_list[0].output = output
        _check_output_suffix(job_list[0].input, output, to)
    if not job_list:
        raise RewriteError(f"{', '.join(map(str, models))}: not a SavedModel (no saved_model.pb) and no "
                           f"models in it ({formats.suffixes_shown()}, SavedModel directories)")
    return job_list


def _check_output_suffix(model: Path, output: Path, to: str | None) -> None:
    """-o named like another format than the one this run writes: refused before anything runs."""
    try:
        input_format = formats.detect_format(model)
    except BadInput:
        return  # a model that cannot be read: its own error comes when the run reads it
    formats.check_output_suffix(output, input_format, to)


def _report_asked(report_path: Path | None, parameter: str = "report_path") -> Path | None:
    """--check and --dry-run write nothing unless the command line asks: a config's ``report``
    or ``html`` (the pre-commit hook runs ``--check`` under whatever pyproject.toml a repository
    has) is not written."""
    source = click.get_current_context().get_parameter_source(parameter)
    return report_path if source == click.core.ParameterSource.COMMANDLINE else None


def _run_jobs(job_list: list[batch.Job], *, processes: int, show_each: bool, **run_args) -> list[batch.JobResult]:
    """Run every job; with ``show_each``, one progress line per finished model on stderr, counting
    the models finished (with --jobs they finish out of order). Ctrl-C exits 130, SIGTERM during
    a --jobs run 143: what was not complete was not written."""
    finished = progress_lines.Finished(lambda line: click.echo(line, err=True), len(job_list))

    def on_done(_index: int, result: batch.JobResult) -> None:
        if show_each:
            finished(formats.shown(result.input), result.status, result.seconds)

    try:
        return batch.run_all(job_list, processes=processes, on_done=on_done, **run_args)
    except KeyboardInterrupt:
        click.echo("gconv-rewrite: interrupted; outputs not yet complete were not written", err=True)
        sys.exit(130)
    except workers.Stopped as stopped:  # SIGTERM during a --jobs run
        click.echo(f"gconv-rewrite: stopped by {signal.Signals(stopped.signum).name}; outputs not yet complete "
                   "were not written", err=True)
        sys.exit(stopped.exit_code)


def _write_report(report_path: Path, protected: list[Path], results: list[batch.JobResult], code: int, *,
                  verbose: bool, as_json: bool = False) -> None:
    """--report: the run's JSON document, written atomically and never over a file a model reads.
    It is written once the models are committed (it says what was written); if it fails then, the
    error says which models were written all the same."""
    document = envelope.document(results, code)
    if str(report_path) == "-":  # stdout: the text summary went to stderr
        click.echo(json.dumps(document, indent=2))
        return
    try:
        with formats.atomic_output(report_path, protected=protected) as staging:
            (staging / report_path.name).write_text(json.dumps(document, indent=2) + "\n")
    except RewriteError as error:
        written = [r.output for r in results if r.output is not None and (r.report or {}).get("written")]
        if written:
            error = OutputError(error.message.replace("; nothing was written", "; the report was not written") +
                                 f", but the model output{'s' if len(written) > 1 else ''} "
                                 f"{', '.join(written)} {'were' if len(written) > 1 else 'was'} written")
        _fail(error, verbose, as_json=as_json, results=results)


def _print_lines(findings: list[lint.Finding], *, quiet: bool, near_misses: bool = True) -> None:
    """``path: location: CODE message`` on stdout, one per finding; -q keeps the findings and the
    errors (severity "error") and drops the near misses."""
    for finding in findings:
        if finding.severity == "error" or (near_misses and finding.severity == "warning" and not quiet):
            click.echo(lint.text_line(finding))


def _print_batch(results: list[batch.JobResult], findings: list[lint.Finding], code: int, *, quiet: bool, say,
                 check: bool) -> None:
    """Several models: each one's details on stderr; a line per finding, near miss and failed
    model; then (not --check, which prints like a linter) the table; and a count per status."""
    for r in results:
        if r.details and not quiet:
            click.echo("\n".join([f"{r.input}:"] + r.details), err=True)
    _print_lines(findings, quiet=quiet)
    if not check:
        say(batch.table(results))
    say(f"{len(results)} models: " + ", ".join(
        f"{n} {s}" for s, n in sorted(_count(r.status for r in results).items())) + f"; exit {code}")


def _print_single(result: batch.JobResult, findings: list[lint.Finding], *, quiet: bool, say, mode: str,
                  check: bool, dry_run: bool, per_node: bool) -> None:
    """One model: its error (with the verification table or traceback), or its summary, and
    what --check (a line per finding and near miss, kept under -q) / --dry-run found.
    ``per_node``: --target or --auto chose the form of each conv."""
    if result.error is not None:
        if result.details and not quiet:  # the verification table, or the traceback with -v
            click.echo("\n".join(result.details), err=result.status != "verification-failed")
        click.echo(f"gconv-rewrite: error: {result.error}", err=True)
        return
    say(result.summary)
    found = len((result.report or {}).get("rewrites", []))
    if check:
        _print_lines(findings, quiet=quiet)
        noun = "fusable pattern" if mode == "fuse" else "expandable convolution"
        if per_node:  # "check: 2 changes found": convs not yet in the target's form
            noun = "change"
        say(f"check: {found} {noun}{'s' if found != 1 else ''} found")
    elif dry_run:
        say("dry run: nothing written")


def _print_findings(result: batch.JobResult, *, say, check: bool) -> None:
    """Late-bound Lambda groups, once more at the end: --check fails on them, and a written model
    keeps computing what the file computes, which is not what its author meant."""
    late = [s["location"] for s in (result.report or {}).get("skipped", []) if s.get("finding") == "late-binding"]
    if not late:
        return
    where = ", ".join(late)
    if check:
        say(f"check: late binding at {where}: every branch reads the same group, so the model does not compute "
            "what its author meant; --trust-lambdas --repair-late-binding rebuilds each branch with its own slice")
    else:
        say(f"warning: late binding at {where} left as it is: every branch reads the same group, as in the file, "
            "which is not what its author meant; pass --repair-late-binding to rebuild each branch with its own "
            "slice")


def _target_output(path: Path, name: str, to: str | None) -> Path:
    """NAME.TARGET with the extension the fused output would have: m.TARGET.onnx, m.TARGET.keras
    (from .keras, .h5 or .hdf5), sm.TARGET/ (a SavedModel), m.TARGET.tflite (--to tflite)."""
    fused = formats.default_output(path, "fuse", to)  # NAME.fused.EXT, NAME.fused/ or NAME.tflite
    stem = path.name if path.is_dir() else path.stem
    return fused.with_name(f"{stem}.{name}{fused.name[len(stem):].removeprefix('.fused')}")


def _count(items) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def _check_report_path(report_path: Path | None, jobs: list[batch.Job], inputs: Path | None) -> list[Path]:
    """--report may name nothing a model reads (the model, its external data, its SavedModel
    folder, the --inputs file) nor a model's output; returns what it must never replace."""
    if report_path is None or str(report_path) == "-":
        return []
    _check_report_folder(report_path)
    read = [f for job in jobs for f in formats.input_files(job.input)]
    if inputs is not None and inputs.exists():
        read.append(inputs)
    formats.check_not_read(report_path, read, "--report")
    for job in jobs:
        if job.output is not None and (report_path.absolute() == job.output.absolute()
                                       or formats.same_file(report_path, job.output)):
            raise RewriteError(f"{report_path}: it is also the output of {job.input}; choose another --report")
    return read


def _check_report_folder(report_path: Path) -> None:
    """--report's place, before any model is read or written: a file in a folder that exists and
    can be written (found after the run, the models would be written and the report lost)."""
    folder = report_path.parent if str(report_path.parent) else Path(".")
    if report_path.is_dir():
        raise BadInput(f"{formats.shown(report_path)}: --report names a folder; give a file name")
    if not folder.is_dir():
        raise BadInput(f"{formats.shown(report_path)}: --report's folder {formats.shown(folder)} does not exist")
    try:  # a file made and removed there: os.access says yes to root where the write then fails (/sys, ro mounts)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise BadInput(f"{formats.shown(report_path)}: --report's folder {formats.shown(folder)} is not writable "
                       f"({error.strerror or error})") from None


def _check_html_path(html_path: Path | None, jobs: list[batch.Job], inputs: Path | None, report_path: Path | None,
                     *, force: bool, many: bool) -> dict:
    """--html may name nothing a model reads, no model output nor the --report file, and replaces
    a page only with --force. Returns each page to write (the index first, for several models)
    and what none of them may replace. Several models: one page per model beside the index."""
    if html_path is None:
        return {}
    read = [f for job in jobs for f in formats.input_files(job.input)]
    if inputs is not None and inputs.exists():
        read.append(inputs)
    outputs = [job.output for job in jobs if job.output is not None] + ([report_path] if report_path else [])
    pages = [html_path] + (html.model_page_names(html_path, [str(job.input) for job in jobs]) if many else [])
    for page in pages:
        html.check_page_path(page, read, force, outputs)
    return {"read": read, "pages": pages}


def _page_report(result: batch.JobResult, mode: str) -> dict:
    """What a model's page shows: its report, or (a failed model) its error and the details."""
    if result.report is not None:
        return result.report
    return {"input": result.input, "mode": mode, "error": result.error, "details": result.details,
            "exit_code": result.exit_code}


def _write_html(html_path: Path, planned: dict, results: list[batch.JobResult], code: int, *, mode: str,
                force: bool, verbose: bool, as_json: bool = False) -> None:
    """--html: each model's review page, then (several models) the index linking them; each file
    written atomically once the models are committed, like --report."""
    pages, read = planned["pages"], planned["read"]
    try:
        if len(pages) == 1:
            (result,) = results
            html.write_page(html_path, html.render_page(_page_report(result, mode)), protected=read, force=force)
            return
        rows = []
        for result, page in zip(results, pages[1:]):
            html.write_page(page, html.render_page(_page_report(result, mode)), protected=read, force=force)
            row = batch.table_row(result)
            rows.append({**row, "page": page.name})
        html.write_page(html_path, html.render_index(rows, code), protected=read, force=force)
    except RewriteError as error:
        written = [r.output for r in results if r.output is not None and (r.report or {}).get("written")]
        if written:
            error = RewriteError(error.message + f"; the review page was not written, but the model output"
                                 f"{'s' if len(written) > 1 else ''} {', '.join(written)} "
                                 f"{'were' if len(written) > 1 else 'was'} written")
        _fail(error, verbose, as_json=as_json, results=results)


def _printable(result: batch.JobResult) -> batch.JobResult:
    """The result as printed on a terminal: a path with a newline must not forge a second line
    (``gconv-rewrite: error: ...``), nor an escape sequence repaint the screen; the one-line error
    escaped whole, the summary where it quotes the input or output path."""
    summary = result.summary
    for path in {result.input, result.output} - {None}:
        if formats.shown(path) != path:
            summary = summary.replace(path, formats.shown(path))
    return dataclasses.replace(result, input=formats.shown(result.input), summary=summary,
                               output=None if result.output is None else formats.shown(result.output),
                               error=None if result.error is None else formats.shown(result.error))


def _fail(error: RewriteError, verbose: bool, *, as_json: bool = False, results: list[batch.JobResult] = ()):
    """A failure of the whole run: one line on stderr (the traceback with -v) and, under
    --format json, the envelope with the error on stdout (with the models' records where they ran:
    a --report or --html that could not be written after the models were)."""
    code = error.exit_code if error.exit_code else EXIT_BAD_INPUT
    if as_json:
        document = envelope.document(list(results), code,
                                     error={"kind": envelope.error_kind(error), "message": error.message})
        click.echo(json.dumps(document, indent=2))
    if verbose:
        raise error
    click.echo(f"gconv-rewrite: error: {formats.shown(error.message)}", err=True)
    sys.exit(code)


def entry() -> None:
    """The ``gconv-rewrite`` command (and ``python -m gconv_rewrite``): ``main``, then, once
    TensorFlow has been imported, an exit that skips the interpreter's teardown. Everything the
    run writes is written, renamed and closed before ``main`` returns; what an exit would still do
    is run the ``atexit`` handlers (logging's flush, temporary folders, child processes) — run
    here — and then destroy TensorFlow's and Keras's objects one by one, about a second for
    nothing (1.1 s of a 12.7 s Keras fuse, measured). Tests call ``main`` and keep the usual exit."""
    try:
        main()
    except SystemExit as done:
        code = done.code
        if "tensorflow" not in sys.modules or not (code is None or isinstance(code, int)):
            raise
    else:
        return
    try:
        sys.stdout.flush()  # a closed pipe: the usual exit says so as Python always does
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    import atexit
    import os

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code or 0)
