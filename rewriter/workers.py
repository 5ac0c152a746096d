"""The worker processes of a ``--jobs`` run, and how a run ends when it is stopped.

Who acts on a signal:

- **Ctrl-C** reaches the whole process group. Workers ignore SIGINT from the moment they are
  exec'd (they are started with SIGINT ignored, see ``spawning``): the main process alone decides.
  It raises ``KeyboardInterrupt``, dispatches nothing more, and stops every worker (``stop``). The
  same happens when SIGINT reaches the main process alone.
- **SIGTERM to the main process** (a CI runner's timeout) raises ``Stopped`` in it during a
  parallel run (``stop_on_sigterm``), and it stops its workers the same way.
- **Stopping a worker** is SIGTERM: it raises ``WorkerStop`` (a ``SystemExit``) in the worker, whose
  staging folder is then removed by ``formats.atomic_output`` on the way out, and the worker exits.
  One still busy after ``STOP_GRACE_SECONDS`` (inside a long native call) gets SIGKILL; its staging
  folder is swept by the next run.
- **The main process killed outright** (SIGKILL, a crash): on Linux every worker has asked the
  kernel for SIGKILL when the thread that started it dies (``prctl(PR_SET_PDEATHSIG)``), so it dies
  with its parent. Elsewhere a watcher thread in each worker notices that its parent changed
  within ``ORPHAN_POLL_SECONDS`` and stops the worker by SIGTERM. Besides, a worker checks that its
  parent is still the run's main process before each model and after each phase of one, so the
  last check comes right before the commit: an orphan never starts a model and never commits one.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

# How long a stopped worker has to clean up its staging before it is killed.
STOP_GRACE_SECONDS = 5.0
# How often a worker without PR_SET_PDEATHSIG (not Linux) looks whether its parent is gone.
ORPHAN_POLL_SECONDS = 0.5
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Stopped(BaseException):
    """The main process was sent a signal that ends the run (SIGTERM); exit 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum


class WorkerStop(SystemExit):
    """Raised in a worker told to stop, or whose parent is gone: unwinds (removing the staging of
    the model in progress) and ends the worker. A ``SystemExit``: no traceback is printed."""


# -- in the main process -----------------------------------------------------------------------------


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises ``Stopped`` in the main process while inside (the default would end it at
    once and leave its workers running); the previous handler is restored afterwards."""
    if not _in_main_thread():  # only the main thread may set handlers (the Python API in a thread)
        yield
        return

    def on_sigterm(signum, _frame):
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def spawning() -> Iterator[None]:
    """Processes started inside begin life with SIGINT ignored: a spawned worker imports modules
    for seconds before any code of ours runs in it, and a Ctrl-C then must not print a traceback
    from it. SIGINT is blocked meanwhile, so one that arrives is held, then raised here, not lost."""
    if not _in_main_thread() or not hasattr(signal, "pthread_sigmask"):  # not POSIX
        yield
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


@contextmanager
def stopping_workers() -> Iterator[None]:
    """On any exception inside (Ctrl-C, SIGTERM, a bug), stop the worker processes started
    inside, then let the exception go on: no worker outlives the run."""
    before = set(multiprocessing.active_children())
    try:
        yield
    except BaseException:
        stop([child for child in multiprocessing.active_children() if child not in before])
        raise


def stop(children: list, grace: float = STOP_GRACE_SECONDS) -> None:
    """Stop ``children`` (processes): SIGTERM (each removes its staging and exits), then SIGKILL
    for those still alive after ``grace`` seconds, or at once on a second Ctrl-C."""
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace
    try:
        for child in children:
            child.join(max(0.0, deadline - time.monotonic()))
    finally:
        for child in children:
            if child.is_alive():
                child.kill()
                child.join(1.0)


# -- in a worker -------------------------------------------------------------------------------------


def how_it_ended(exitcode: int | None) -> str:
    """How a child process ended without an answer, for the one-line error: the signal that killed
    it (SIGKILL with the OOM killer named), or its exit code."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}" + (" (out of memory? the OOM killer sends SIGKILL)" if name == "SIGKILL" else "")
    return f"exited with code {exitcode} without an answer"


def start_worker(parent_pid: int) -> None:
    """First thing in every worker: leave SIGINT to the main process, make SIGTERM unwind, and die
    with the parent (``parent_pid``: the run's main process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # inherited from ``spawning``
    signal.signal(signal.SIGTERM, _on_stop)
    sys.unraisablehook = _stop_where_it_cannot_unwind
    if not _ask_death_with_parent():
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="gconv-parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the request above was made
        os._exit(128 + signal.SIGTERM)


def check_parent(parent_pid: int) -> None:
    """Stop this worker when its parent is no longer the run's main process (it was reparented)."""
    if os.getppid() != parent_pid:
        raise WorkerStop(128 + signal.SIGTERM)


def _on_stop(signum, _frame):
    raise WorkerStop(128 + signum)


def _stop_where_it_cannot_unwind(unraisable) -> None:
    """A stop that lands inside a callback (an import lock's weakref, a finalizer) cannot unwind:
    Python would print "Exception ignored" and carry on. End the worker there, quietly; its staging
    is swept by the next run (its owner is gone)."""
    if isinstance(unraisable.exc_value, WorkerStop):
        os._exit(unraisable.exc_value.code if isinstance(unraisable.exc_value.code, int) else 1)
    sys.__unraisablehook__(unraisable)


def _ask_death_with_parent() -> bool:
    """Linux: SIGKILL this process when its parent dies. False where that cannot be asked."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    """Where the kernel cannot kill an orphan: look, and stop this worker once reparented."""
    while os.getppid() == parent_pid:
        time.sleep(ORPHAN_POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)
