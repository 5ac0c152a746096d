"""Platforms (issue 24): output that survives a console which is not UTF-8 (cp1252 on Windows),
and a liveness check for a run's leftovers that never signals anyone (``os.kill(pid, 0)`` sends
CTRL_C_EVENT on Windows) and counts a Linux zombie as gone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from gconv_rewrite import formats
from tests.conftest import op_counts
from tests.test_formats_table import onnx_split_model

REPO = Path(__file__).resolve().parents[1]


def run_cp1252(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "cp1252", "PYTHONUTF8": "0",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "gconv_rewrite", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, timeout=300)


# -- a console that is not UTF-8 -------------------------------------------------------------------


def test_help_survives_a_cp1252_console(tmp_path):
    done = run_cp1252("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode("cp1252", "replace")
    text = done.stdout.decode("cp1252")  # what the console shows: valid cp1252 throughout
    assert "Fuse Split/Slice -> N Conv -> Concat" in " ".join(text.split())
    assert "Traceback" not in done.stderr.decode("cp1252", "replace")


def test_a_run_survives_a_cp1252_console(tmp_path):
    """A model whose name holds characters cp1252 lacks: written, its name shown in ASCII."""
    model = onnx_split_model(tmp_path / "a→b.onnx")
    done = run_cp1252(model.name, "-o", "out→.onnx", cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode("cp1252", "replace")
    text = done.stdout.decode("cp1252")
    assert "a->b.onnx: fuse" in text and "wrote out->.onnx" in text
    assert op_counts(onnx.load(tmp_path / "out→.onnx")) == {"Conv": 1}
    failed = run_cp1252("missing→.onnx", cwd=tmp_path)  # an error line too
    assert failed.returncode == 2
    assert failed.stderr.decode("cp1252").startswith("gconv-rewrite: error: missing->.onnx")


def test_ascii_fallback_names_what_it_knows_and_marks_the_rest():
    from gconv_rewrite import cli

    cli.survive_console()  # registers the handler
    assert "a → b … c — d ✓".encode("cp1252", errors="gconv-ascii") == "a -> b … c — d ?".encode("cp1252")
    assert "≤ ±".encode("ascii", errors="gconv-ascii") == b"<= +/-"


# -- liveness ---------------------------------------------------------------------------------------


def test_this_process_is_alive_and_nonsense_pids_are_not():
    assert formats._pid_alive(os.getpid())
    assert not formats._pid_alive(0) and not formats._pid_alive(-5) and not formats._pid_alive(True)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX branch")
def test_a_reaped_process_is_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not formats._pid_alive(child.pid)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux /proc")
def test_a_zombie_is_gone_and_a_live_child_is_not():
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert formats._pid_alive(running.pid)
    finally:
        running.kill()
        running.wait()
    pid = os.fork()
    if pid == 0:  # the child exits at once; unreaped, it is a zombie
        os._exit(0)
    try:
        for _ in range(200):  # until the kernel marks it exited
            if formats._zombie(pid):
                break
            import time

            time.sleep(0.01)
        assert formats._zombie(pid)
        assert not formats._pid_alive(pid)
    finally:
        os.waitpid(pid, 0)


def test_zombie_parsing_reads_the_state_after_the_command(tmp_path, monkeypatch):
    """A command name may hold spaces and parentheses: the state is the field after the last ')'."""
    import builtins

    real_open = builtins.open
    lines = {"/proc/7/stat": b"7 (a) b) Z 1 7", "/proc/8/stat": b"8 (x) Z) S 1 8"}
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: __import__("io").BytesIO(lines[p]) if p in lines
                        else real_open(p, *a, **k))
    assert formats._zombie(7) and not formats._zombie(8)


class FakeKernel32:
    """OpenProcess / GetExitCodeProcess / CloseHandle as Windows answers them."""

    def __init__(self, processes: dict[int, int | None]):
        self.processes = processes  # pid -> exit code (259: still active; None: access denied)
        self.closed: list[int] = []

    def OpenProcess(self, access, inherit, pid):
        assert access == 0x1000 and inherit is False
        if pid not in self.processes or self.processes[pid] is None:
            return 0
        return 1000 + pid

    def GetExitCodeProcess(self, handle, code_ref):
        code_ref._obj.value = self.processes[handle - 1000]
        return 1

    def CloseHandle(self, handle):
        self.closed.append(handle)
        return 1


def test_the_windows_branch_asks_the_exit_code_and_never_signals(monkeypatch):
    kernel32 = FakeKernel32({10: 259, 11: 0, 12: None})
    errors = {12: 5}  # ERROR_ACCESS_DENIED: it exists, it is not ours
    asked: list[int] = []

    def open_process(access, inherit, pid):
        asked.append(pid)
        return FakeKernel32.OpenProcess(kernel32, access, inherit, pid)

    monkeypatch.setattr(kernel32, "OpenProcess", open_process)
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(formats, "_kernel32", lambda: kernel32)
    monkeypatch.setattr(formats, "_last_error", lambda: errors.get(asked[-1], 87))  # 87: invalid parameter
    monkeypatch.setattr(os, "kill", lambda *a: pytest.fail("os.kill sends CTRL_C_EVENT on Windows"))

    assert formats._pid_alive(10)  # STILL_ACTIVE
    assert not formats._pid_alive(11)  # exited with 0
    assert formats._pid_alive(12)  # access denied: someone else's live process
    assert not formats._pid_alive(13)  # no such process
    assert kernel32.closed == [1010, 1011]  # every handle opened is closed
