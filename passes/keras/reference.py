"""The original Keras model loaded and run in a process of its own, beside the rewrite.

    main process:  import TF ─ read + rebuild ─ rewrite ─ save ─ load + run the written model ─┐
    reference:     import TF ─ tf-keras (or Keras 3) loads the file ──── run the original ──────┴─ compare

The proof compares the written model with the file as Keras itself loads it: tf-keras for a file
tf-keras wrote, which costs tf-keras's rebuild of every layer (5.5 s of a 1,199-layer ResNeXt's
17 s, measured) besides the tool's own rebuild in Keras 3. A process of its own does that while
the main process does its own work: it is started before the main process imports TensorFlow
(``reference_ahead``, below), for a tf-keras reference only (``worth_a_process``) and only
where a core is idle (``core_to_spare``): otherwise it would only compete for CPU and add a second
TensorFlow import. It only loads and runs. The verification inputs (made in the main process, as for every backend), the
boundary layers to expose, and the comparison stay in the main process; arrays travel as .npz
files in a scratch folder of the main process, messages through a pipe:

    reference → main   ("loaded", {name, note, pid}) | ("unloaded", note) | ("error", message)
    main → reference   ("run", boundary layer names, feeds files)
    reference → main   ("ran", boundary layers exposed, output files) | ("error", message)

Where neither tf-keras nor Keras 3 can load the file ("unloaded"), the main process compares with
its own rebuild of the config, as it always did. A reference process that dies (the OOM killer) is
a one-line error, never a hang: the main process reads the end of the pipe. It is started as the
``--jobs`` workers are (``gconv_rewrite.workers``: SIGINT left to the main process, dead with it) and
killed when the run ends, however it ends; it writes nothing but its answers in the main process's
scratch folder, so it needs no grace to clean up.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from gconv_rewrite import workers
from gconv_rewrite.errors import VerificationImpossible, one_line

log = logging.getLogger(__name__)


@contextmanager
def reference_ahead(source: Path, options, *, apply: bool) -> Iterator[ReferenceProcess | None]:
    """The original's reference run, started before anything else of the run (before TensorFlow
    is imported in the driver's process) so that it loads while that process reads and rewrites:
    handed to the backend as ``reference_ahead``; None where the run proves nothing against
    Keras's load of the file (no verification, a ``--check``, a conversion, a late-binding repair:
    its reference is the tool's rebuild). Killed on the way out, however the run ends. The driver
    finds it through the Keras row of the format table (``gconv_rewrite.formats.Format.reference_ahead``)."""
    if not apply or not options.verify or options.to not in (None, "keras") or options.repair_late_binding:
        yield None
        return
    with reference_process(source, trust_lambdas=options.trust_lambdas) as process:
        yield process


@contextmanager
def reference_process(path: Path, *, trust_lambdas: bool) -> Iterator[ReferenceProcess | None]:
    """A reference process loading ``path``, killed on the way out; None where the run loads the
    reference in its own process instead: a process that has imported TensorFlow already
    (``imports_beside_us``); a file that is no Keras file it can load (``worth_a_process``);
    a machine without an idle core (``core_to_spare``); inside a ``--jobs`` worker (the runs are parallel
    already: a process more each would add memory, not speed; a daemonic one may not start
    any), or where no process can be started (said at debug level)."""
    from gconv_rewrite import formats

    if (multiprocessing.parent_process() is not None or not imports_beside_us() or not worth_a_process(path)
            or not core_to_spare()):
        yield None
        return
    with formats.scratch_dir() as scratch:
        try:
            process = ReferenceProcess(path, trust_lambdas=trust_lambdas, scratch=scratch)
        except OSError as exc:
            log.debug("no reference process (%s): the original loads in this process", exc)
            yield None
            return
        try:
            yield process
        finally:
            process.close()


def imports_beside_us() -> bool:
    """Whether this process has yet to import TensorFlow (the command line, a fresh script): the
    reference process's own import then runs beside this one's. In a process that has imported it
    already (a notebook, a test suite calling the API), the process's import would be all wait for
    a small model (about 3 s before its first answer; the test suite ran 16 min instead of 12)."""
    import sys

    return "tensorflow" not in sys.modules


def core_to_spare() -> bool:
    """Whether a core is likely idle for the reference process: the last minute's load average is
    below the number of cores. On a machine whose cores are busy the process only competes with
    the run for CPU and adds its own TensorFlow import (measured, ResNeXt-50 ``.h5`` on 2 cores:
    11.5 s against 16.9 s in-process at a load average ~0.8, 14.2 s against 15.6 s at ~1.5, 19.9 s
    against 17.9 s at ~2.6). Not below ``cores - 1``: the average still counts a run that has just
    ended (a benchmark's or a script's previous run), which no longer takes a core."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average (Windows): assume the cores are ours
        return True
    return load < (os.cpu_count() or 1)


def worth_a_process(path: Path) -> bool:
    """Whether the file is a Keras file whose reference a process of its own can load, read from
    the file's version stamp alone (this runs before anything else of the run, before the file is
    validated: any doubt is no): a file tf-keras (or Keras 2) wrote, where tf-keras is installed,
    or a Keras 3 file (Keras's own load, or where Keras cannot load it the tool's rebuild from the
    config, made in that process). Since the analysis stands in for the layers a fusion removes,
    the reference's load and runs are the longer part of the run, and worth a second TensorFlow
    import on an idle core (measured, ResNeXt-50 ``.keras`` whose reference is the rebuild, on 2
    cores: 12.6–13.3 s in-process, 8.3–8.7 s with the process)."""
    import importlib.util
    import json
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                info = archive.getinfo("metadata.json")
                if info.file_size > 1 << 20:
                    return False
                version = json.loads(archive.read(info)).get("keras_version", "")
        else:
            import h5py

            with h5py.File(path, "r") as handle:
                version = handle.attrs.get("keras_version", b"")
        version = version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # not readable as either: the run says so itself
        return False
    if version.startswith(("1.", "2.")):
        return importlib.util.find_spec("tf_keras") is not None
    return version.startswith("3.")


class ReferenceProcess:
    """The main process's side: start, ask for one run, read the answers, kill."""

    def __init__(self, path: Path, *, trust_lambdas: bool, scratch: Path):
        context = multiprocessing.get_context("spawn")  # TensorFlow's thread pools do not survive fork
        self.scratch = scratch
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=serve, args=(child_end, str(path), trust_lambdas, os.getpid()),
                                       name="gconv-reference", daemon=True)
        with workers.spawning():
            self.process.start()
        child_end.close()  # the process's death is then the end of this pipe, not a wait forever
        self.pid = self.process.pid
        self.asked: tuple[list[str], list] | None = None  # the last request: (extra, sizes)
        self.requests = self.answered = 0

    def request(self, extra: list[str], sizes: list) -> None:
        """Ask for the original's outputs and ``extra`` layers' at each of ``sizes`` (Feeds). The
        backend asks as soon as it knows the rewrites (``KerasBackend.emit``), so the original
        runs while this process writes the model; the proof asks again only if it wants another
        run, and then the first run's answer is skipped."""
        if self.asked is not None and self.asked[0] == list(extra) and _same_feeds(self.asked[1], sizes):
            return
        files = []
        for n, feeds in enumerate(sizes):
            file = self.scratch / f"feeds-{self.requests}-{n}.npz"
            np.savez(file, *feeds.values())  # by position: the model's input order
            files.append(str(file))
        self._send(("run", list(extra), files))
        self.asked, self.requests = (list(extra), sizes), self.requests + 1

    def receive(self) -> tuple:
        """The next answer; VerificationImpossible when the process died before giving it."""
        try:
            return self.connection.recv()
        except (EOFError, OSError):
            self.process.join(5.0)
            raise VerificationImpossible(f"{_death(self.process.exitcode)}; nothing was written (pass --no-verify "
                                         "to write the model without proof)") from None

    def receive_run(self) -> tuple:
        """The answer to the last request (those to earlier ones are skipped)."""
        while True:
            answer = self.receive()
            self.answered += 1
            if self.answered >= self.requests:
                return answer

    def close(self) -> None:
        """Kill the process (it holds nothing to clean up) and close the pipe."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5.0)
        self.connection.close()

    def _send(self, message) -> None:
        try:
            self.connection.send(message)
        except OSError:
            pass  # it died: receive() says how


def _same_feeds(these: list, those: list) -> bool:
    return len(these) == len(those) and all(
        list(a) == list(b) and all(np.array_equal(a[name], b[name]) for name in a) for a, b in zip(these, those))


def _death(exitcode: int | None) -> str:
    return f"the process running the original model for the comparison {workers.how_it_ended(exitcode)}"


class ReferenceRunner:
    """``gconv_rewrite.proof``'s runner for the original, run by the reference process: ``start(sizes)``
    asks for the run and returns the call that awaits it. ``fallback(note, extra)`` makes the
    in-process runner (the tool's rebuild) for a file the process could not load; ``name``,
    ``note`` and ``pid`` say what ran the original once it has."""

    def __init__(self, process: ReferenceProcess, outputs: list[str], inputs: list, extra: list[str],
                 fallback: Callable):
        self.process, self.outputs, self.inputs, self.output_specs = process, outputs, inputs, None
        self.wanted, self.extra = list(extra), []
        self.fallback = fallback
        self.name = self.note = ""
        self.pid: int | None = None

    def start(self, sizes: list) -> Callable[[], tuple[list[dict], list[str]]]:
        self.process.request(self.wanted, sizes)
        return lambda: self._values(sizes)

    def _values(self, sizes: list) -> tuple[list[dict], list[str]]:
        from gconv_rewrite.passes.keras.model import named_values

        waited = time.perf_counter()
        answer = self.process.receive()
        if answer[0] == "unloaded":
            runner, self.note, self.name = self.fallback(answer[1], self.wanted)
            self.extra = list(runner.extra)
            return [runner(feeds) for feeds in sizes], self.extra
        if answer[0] == "loaded":
            self.name, self.note, self.pid = answer[1]["name"], answer[1]["note"], answer[1]["pid"]
            answer = self.process.receive_run()
        if answer[0] != "ran":
            raise VerificationImpossible(answer[1])
        self.extra = list(answer[1])
        log.debug("waited %.2f s for the reference process's run", time.perf_counter() - waited)
        values = []
        for file in answer[2]:
            with np.load(file, allow_pickle=False) as arrays:
                values.append(named_values(self.outputs, self.extra,
                                           [arrays[f"arr_{i}"] for i in range(len(arrays.files))]))
        return values, self.extra


# -- in the reference process ---------------------------------------------------------------------

def serve(connection, path: str, trust_lambdas: bool, parent_pid: int) -> None:
    """The reference process: load the file, answer each run asked for, end with the pipe."""
    workers.start_worker(parent_pid)
    # It was started for the one idle core: TensorFlow's threads kept to it, not competing with
    # the main process's (which keeps TensorFlow's default) on the other. A setting of the user's
    # stays. (Measured alone, ResNeXt-50 .h5 on 2 cores: within the run-to-run noise, ±0.3 s.)
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    try:
        model = _load(connection, Path(path), trust_lambdas)
        while model is not None:  # until the main process closes the pipe (EOFError)
            _, extra, files = connection.recv()
            connection.send(_run(model, extra, files))
    except (EOFError, OSError):
        pass  # the main process needs no more answers (its run ended)
    finally:
        connection.close()


def _load(connection, path: Path, trust_lambdas: bool):
    """The original as tf-keras or Keras 3 loads it, announced (None: announced why not)."""
    from gconv_rewrite import quiet

    quiet.import_tensorflow()  # its native log kept off stderr, as in the main process
    from gconv_rewrite.passes.keras import _config
    from gconv_rewrite.passes.keras import model as km

    try:
        kfile = _config.read_file(path, weights=False)  # tf-keras (or Keras) reads them itself
        has_lambdas = bool(_config.lambda_names(kfile.config))
        if has_lambdas and not trust_lambdas:  # the main process refuses the file: run no code
            connection.send(("unloaded", ""))
            return None
        loaded = km.load_reference(path, kfile, has_lambdas=has_lambdas, run_code=has_lambdas)
    except Exception as exc:
        connection.send(("error", f"the original model cannot be loaded for the comparison ({one_line(exc)})"))
        return None
    if isinstance(loaded, str):  # neither Keras loads it: the tool's rebuild, made here as well
        try:
            loaded = km.rebuilt_from_file(path, _config.read_file(path), loaded, trusted=trust_lambdas)
        except Exception:  # the main process rebuilds it itself, and says what fails
            connection.send(("unloaded", loaded))
            return None
    model, note, name = loaded
    connection.send(("loaded", {"name": name, "note": note, "pid": os.getpid()}))
    return model


def _run(model, extra: list[str], files: list[str]) -> tuple:
    from gconv_rewrite.passes.keras import model as km

    try:
        runnable, present = km.with_extra_outputs(model, extra)
        outputs = []
        for file in files:
            with np.load(file, allow_pickle=False) as arrays:
                feeds = {key: arrays[key] for key in (f"arr_{i}" for i in range(len(arrays.files)))}
            values = km._run(runnable, feeds)
            output = Path(file).with_name(f"reference-{Path(file).name}")
            np.savez(output, *values)
            outputs.append(str(output))
    except Exception as exc:
        return ("error", f"the original model cannot run on the verification inputs ({one_line(exc)}); "
                         "pass --no-verify to write it without proof")
    return ("ran", present, outputs)
