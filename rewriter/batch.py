"""Many models per run: find them, run each (optionally in N processes), collect the verdicts.

One bad model never stops the others: each job turns its failure into a result row carrying the
exit code and the one-line error. The run's exit code is the worst of its models' codes.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gconv_rewrite import envelope, formats, targets, workers
from gconv_rewrite.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, RewriteError, VerificationFailed
from gconv_rewrite.report import format_summary, format_verification

MODEL_SUFFIXES = formats.MODEL_SUFFIXES  # (the table at import; walks ask formats.model_suffixes())
# The last dotted part of every name the tool writes beside an input: NAME.fused.onnx,
# NAME.expanded.keras, NAME.auto.onnx, NAME.TARGET.onnx, NAME.fused/ (a SavedModel). A folder
# walked again must not rewrite the rewrite (m.onnxruntime-cpu.onnxruntime-cpu.onnx).
OUTPUT_TAGS = frozenset({"fused", "expanded", "auto", *targets.names()})


@dataclass
class Job:
    input: Path
    output: Path | None  # None: --check / --dry-run
    mirrored: bool = False  # the output mirrors the input under an output folder: create its parents


@dataclass
class JobResult:
    input: str
    output: str | None
    status: str  # rewritten, unchanged, would-rewrite, clean, dry-run, verification-failed, error
    exit_code: int
    error: str | None = None
    report: dict[str, Any] | None = None
    summary: str = ""
    seconds: float = 0.0
    details: list[str] = field(default_factory=list)
    error_kind: str | None = None  # the JSON error's kind (gconv_rewrite.envelope), with ``error``

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input, "output": self.output, "status": self.status, "exit_code": self.exit_code,
                "error": self.error, "seconds": round(self.seconds, 3), "report": self.report}


def _is_savedmodel(path: Path) -> bool:
    """A folder that is one model (the format table's folder formats: a SavedModel), not one to walk."""
    return path.is_dir() and formats.folder_format(path) is not None


def is_own_output(name: str) -> bool:
    """Whether ``name`` (a file or a SavedModel folder) is one the tool writes: NAME.TAG.EXT or
    NAME.TAG with TAG in ``OUTPUT_TAGS``, or a staging / lock name (``.NAME.gconv-…``) of a run."""
    if _is_staging(name):
        return True
    stem = name[: -len(Path(name).suffix)] if name.lower().endswith(formats.model_suffixes()) else name
    return "." in stem and stem.rsplit(".", 1)[1] in OUTPUT_TAGS


def _is_staging(name: str) -> bool:
    """A run's staging folder, superseded output or lock beside an output: ``.OUT.gconv-…``."""
    return name.startswith(".") and ".gconv" in name


def walk(folder: Path, skip: Path | None = None) -> Iterator[Path]:
    """Models under ``folder``, sorted: files by suffix, SavedModel directories (not entered).
    Left out: every name the tool writes (``is_own_output``) and the folder ``skip`` (the run's
    own output folder, which may lie inside the input folder: mirroring it again would nest)."""
    skipped = skip.resolve() if skip is not None and skip.is_dir() else None
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        dirs.sort()
        for d in list(dirs):
            path = root_path / d
            if _is_staging(d) or (skipped is not None and path.resolve() == skipped):
                dirs.remove(d)
            elif _is_savedmodel(path):
                dirs.remove(d)
                if not is_own_output(d):
                    yield path
        for name in sorted(files):
            if name.lower().endswith(formats.model_suffixes()) and not is_own_output(name):
                yield root_path / name


def is_batch(models: tuple[Path, ...]) -> bool:
    return len(models) > 1 or any(m.is_dir() and not _is_savedmodel(m) for m in models)


def plan_jobs(models: tuple[Path, ...], output: Path | None, *, mode: str, to: str | None,
              write: bool) -> list[Job]:
    """Expand folders and decide each output: mirrored under ``output`` (a folder) when given,
    else beside each input with the default name."""
    jobs: list[Job] = []
    for model in models:
        if model.is_dir() and not _is_savedmodel(model):
            found = list(walk(model, skip=output))
            jobs.extend(Job(p, _mirror(p, p.relative_to(model), output, mode, to) if write else None,
                            mirrored=output is not None) for p in found)
        else:
            jobs.append(Job(model, _mirror(model, Path(model.name), output, mode, to) if write else None,
                            mirrored=output is not None))
    seen: dict[Path, Path] = {}
    for job in jobs:
        if job.output is not None and job.output in seen:
            raise RewriteError(f"{job.input} and {seen[job.output]} would both be written to {job.output}")
        if job.output is not None:
            seen[job.output] = job.input
    return jobs


def _mirror(path: Path, relative: Path, output: Path | None, mode: str, to: str | None) -> Path:
    if output is None:
        return formats.default_output(path, mode, to)
    named = formats.default_output(Path(relative.name), mode, to).name if to else relative.name
    fmt = formats.format_of_suffix(relative.suffix)
    if to is None and fmt is not None:  # the same name, with the suffix its format writes (.h5 → .keras)
        named = Path(relative.name).with_suffix(formats.row(fmt).write_suffix).name
    return output / relative.parent / named


def run_job(job: Job, *, mode: str, check: bool, dry_run: bool, options, verbose: bool = False) -> JobResult:
    """Run one model; never raises (a failure becomes the row's error)."""
    from gconv_rewrite.api import rewrite

    start = time.perf_counter()
    find_only = check or dry_run
    try:
        if job.output is not None and job.mirrored:
            job.output.parent.mkdir(parents=True, exist_ok=True)
        if dry_run:
            result = _dry_run(job.input, mode, options)
        else:
            result = rewrite(job.input, mode=mode, output=job.output, apply=not find_only, options=options)
        report = result.report
        found = len(report.rewrites)
        # A finding (late binding) is a fault to fix like a group to fuse: not clean.
        findings = [skip for skip in report.skipped if skip.finding]
        if check:
            status, code = ("would-rewrite", EXIT_FAILED) if found or findings else ("clean", EXIT_OK)
        elif dry_run:
            status, code = "dry-run", EXIT_OK
        else:
            status, code = ("rewritten" if found else "unchanged"), EXIT_OK
        return JobResult(str(job.input), report.output, status, code, report=report.to_dict(),
                         summary=format_summary(report), seconds=time.perf_counter() - start)
    except VerificationFailed as failure:
        # The table where the models ran; else (the written file does not load...) the traceback with -v.
        details = format_verification(failure.verification) if failure.verification is not None else \
            (traceback.format_exc().splitlines() if verbose else [])
        return JobResult(str(job.input), None, "verification-failed", failure.exit_code, error=failure.message,
                         seconds=time.perf_counter() - start, details=details,
                         error_kind=envelope.error_kind(failure))
    except RewriteError as error:
        return JobResult(str(job.input), None, "error", error.exit_code, error=error.message,
                         seconds=time.perf_counter() - start,
                         details=traceback.format_exc().splitlines() if verbose else [],
                         error_kind=envelope.error_kind(error))
    except Exception as error:  # a bug in one model's run must not stop the others
        return JobResult(str(job.input), None, "error", EXIT_BAD_INPUT,
                         error=f"internal error: {type(error).__name__}: {error}",
                         seconds=time.perf_counter() - start,
                         details=traceback.format_exc().splitlines() if verbose else [],
                         error_kind=envelope.INTERNAL)


def _dry_run(path: Path, mode: str, options):
    """--dry-run: the rewrite done in memory for its true counts after (gconv_rewrite.api.dry_run);
    where the model cannot be rebuilt (a Keras file read only as data), what a find-only run sees,
    with the reason the counts after are missing."""
    from gconv_rewrite.api import dry_run, rewrite

    try:
        return dry_run(path, mode=mode, options=options)
    except RewriteError as error:
        result = rewrite(path, mode=mode, output=None, apply=False, options=options)
        result.report.after = None
        result.report.dry_run_note = f"the counts after were not computed (the rewrite needs: {error.message})"
        return result


def run_all(jobs: list[Job], *, processes: int, on_done: Callable[[int, JobResult], None], **kwargs) -> list[JobResult]:
    """Run every job, in ``processes`` worker processes when more than one; results in job order.

    Stopped by Ctrl-C (``KeyboardInterrupt``) or SIGTERM (``workers.Stopped``) in a parallel run:
    nothing more is dispatched, every worker is stopped (what it had not committed is not
    written), and the exception goes on to the caller."""
    results: list[JobResult | None] = [None] * len(jobs)
    if processes <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            results[i] = run_job(job, **kwargs)
            on_done(i, results[i])
        return [r for r in results if r is not None]
    import multiprocessing

    # spawn: TensorFlow and onnxruntime thread pools do not survive fork.
    context = multiprocessing.get_context("spawn")
    with workers.stop_on_sigterm(), workers.stopping_workers():
        _run_pool(context, jobs, processes, kwargs, results, on_done)
        # Once a worker dies the pool fails every model it had not finished, without saying whose
        # worker it was: run each of those again alone in its own process, so a death is that
        # model's row and the others get their results.
        unfinished = [i for i, r in enumerate(results) if r is None]
        _run_each_alone(context, jobs, unfinished, processes, kwargs, results, on_done)
    return [r for r in results if r is not None]


def _run_pool(context, jobs: list[Job], processes: int, kwargs: dict, results: list[JobResult | None],
              on_done: Callable[[int, JobResult], None]) -> None:
    """The jobs in a pool of ``processes`` workers, each started by ``workers.start_worker``."""
    pool = ProcessPoolExecutor(max_workers=processes, mp_context=context, initializer=workers.start_worker,
                               initargs=(os.getpid(),))
    try:
        with workers.spawning():  # the pool starts its workers on submit
            futures = {pool.submit(_worker_job, job, kwargs, os.getpid()): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            i = futures[future]
            try:
                results[i] = future.result()
            except BrokenProcessPool:
                continue  # a worker died (OOM killer, kill -9): which model killed it is found after
            on_done(i, results[i])
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # dispatch nothing more; the caller stops the workers
        raise
    pool.shutdown(wait=True)


def _worker_job(job: Job, kwargs: dict, parent_pid: int) -> JobResult:
    """``run_job`` in a worker: not started, and not committed, once the main process is gone
    (the progress hook runs after each phase, the last one right before the commit). A worker
    told to stop ends here, after its staging was removed on the way out."""
    try:
        workers.check_parent(parent_pid)
        options = kwargs["options"]
        report_phase = options.progress

        def check_then_report(phase: str, seconds: float) -> None:
            workers.check_parent(parent_pid)
            if report_phase is not None:
                report_phase(phase, seconds)

        return run_job(job, **{**kwargs, "options": dataclasses.replace(options, progress=check_then_report)})
    except workers.WorkerStop as stop:
        os._exit(stop.code)  # the pool would take this for a result and start the next model


def _child(connection, job: Job, kwargs: dict, parent_pid: int) -> None:
    workers.start_worker(parent_pid)
    connection.send(_worker_job(job, kwargs, parent_pid))
    connection.close()


def _run_each_alone(context, jobs: list[Job], indices: list[int], processes: int, kwargs: dict,
                    results: list[JobResult | None], on_done: Callable[[int, JobResult], None]) -> None:
    """``run_job`` for each of ``indices`` in a process of its own, at most ``processes`` at once;
    a death becomes that model's error row (exit 2). Processes are started here, in the main
    thread: PR_SET_PDEATHSIG follows the thread that started a worker."""
    from multiprocessing.connection import wait

    pending = list(indices)
    running: dict[Any, tuple[int, Any, float]] = {}  # result pipe → (job index, process, start time)
    while pending or running:
        while pending and len(running) < processes:
            i = pending.pop(0)
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(sender, jobs[i], kwargs, os.getpid()), daemon=True)
            with workers.spawning():
                process.start()
            sender.close()
            running[receiver] = (i, process, time.perf_counter())
        for receiver in wait(list(running)):
            i, process, start = running.pop(receiver)
            results[i] = _collect(receiver, process, jobs[i], start)
            on_done(i, results[i])


def _collect(receiver, process, job: Job, start: float) -> JobResult:
    """The result a process sent, or its death as the model's error row."""
    try:
        result = receiver.recv()
    except (EOFError, OSError):
        result = None
    finally:
        receiver.close()
        process.join()
    if result is not None:
        return result
    return JobResult(str(job.input), None, "error", EXIT_BAD_INPUT, error=_death(process.exitcode),
                     seconds=time.perf_counter() - start, error_kind=envelope.WORKER_DIED)


def _death(exitcode: int | None) -> str:
    ended = workers.how_it_ended(exitcode).replace("without an answer", "without a result")
    return f"the worker process running this model {ended}; nothing was written"


def worst(codes: list[int]) -> int:
    return max(codes, default=EXIT_OK)


def table_row(r: JobResult) -> dict[str, Any]:
    """One model's row of the batch table (and of the --html index page)."""
    report = r.report or {}
    verification = report.get("verification") or {}
    verified = ("passed" if verification.get("passed") else "skipped" if verification and not verification.get("ran")
                else "FAILED" if r.status == "verification-failed" else "-")
    return {"input": r.input, "status": r.status, "rewrites": len(report.get("rewrites", [])), "verified": verified,
            "exit_code": r.exit_code, "error": r.error, "output": r.output}


def table(results: list[JobResult]) -> str:
    rows = []
    for r in results:
        row = table_row(r)
        rows.append([r.input, r.status, str(row["rewrites"]), row["verified"], str(r.exit_code),
                     r.error or (r.output or "")])
    headers = ["model", "status", "rewrites", "verified", "exit", "output / error"]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])
