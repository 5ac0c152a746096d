"""Configuration (issue 24): found upward from the model like ruff's and black's, a ``mode`` key
instead of booleans that can contradict, the command line's string forms accepted, contradictory
flags refused, options that do nothing warned about, and ``--show-config``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from gconv_rewrite import config
from tests.conftest import op_counts
from tests.helpers import invoke
from tests.test_formats_table import onnx_split_model

REPO = Path(__file__).resolve().parents[1]
SECTION = "[tool.gconv-rewrite]\n"


def header(result) -> str:
    """The mode the run used, from its summary's first line ('m.onnx: expand')."""
    return result.stdout.splitlines()[0].rsplit(": ", 1)[1]


def settings(result) -> dict[str, tuple[str, str]]:
    """--show-config's lines: key → (value as JSON, where it came from)."""
    found = {}
    for line in result.stdout.splitlines()[1:]:
        setting, source = line.split("  # ")
        key, value = setting.split(" = ", 1)
        found[key] = (value, source)
    return found


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """tmp/repo (a git repository) holding sub/deep/m.onnx; the run starts elsewhere (tmp/elsewhere)."""
    root = tmp_path / "repo"
    (root / ".git").mkdir(parents=True)
    (root / "sub" / "deep").mkdir(parents=True)
    onnx_split_model(root / "sub" / "deep" / "m.onnx")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return root


# -- found upward from the model ---------------------------------------------------------------------


def test_the_repositorys_pyproject_is_found_from_the_model(repo):
    (repo / "pyproject.toml").write_text(SECTION + 'mode = "expand"\n')
    (repo / "sub" / "pyproject.toml").write_text("[tool.black]\nline-length = 100\n")  # no table: passed by
    model = repo / "sub" / "deep" / "m.onnx"
    result = invoke(model, "--check")
    assert result.exit_code == 0 and header(result) == "expand", result.output
    shown = invoke(model, "--show-config")
    assert shown.stdout.splitlines()[0] == f"config file: {repo / 'pyproject.toml'}"
    assert settings(shown)["mode"] == ('"expand"', str(repo / "pyproject.toml"))


def test_the_nearest_table_wins(repo):
    (repo / "pyproject.toml").write_text(SECTION + 'mode = "expand"\n')
    (repo / "sub" / "pyproject.toml").write_text(SECTION + 'mode = "fuse"\natol = 0.25\n')
    shown = settings(invoke(repo / "sub" / "deep" / "m.onnx", "--show-config"))
    assert shown["mode"] == ('"fuse"', str(repo / "sub" / "pyproject.toml"))
    assert shown["atol"] == ("0.25", str(repo / "sub" / "pyproject.toml"))


def test_the_search_stops_at_the_repository_root_then_reads_the_cwd(repo, tmp_path):
    (tmp_path / "pyproject.toml").write_text(SECTION + 'mode = "expand"\n')  # above the repository: not its
    model = repo / "sub" / "deep" / "m.onnx"
    assert header(invoke(model, "--check")) == "fuse"
    assert invoke(model, "--show-config").stdout.splitlines()[0] == "config file: none"
    (tmp_path / "elsewhere" / "pyproject.toml").write_text(SECTION + "seed = 7\n")  # the cwd's: the fallback
    shown = invoke(model, "--show-config")
    assert shown.stdout.splitlines()[0] == "config file: pyproject.toml"
    assert settings(shown)["seed"] == ("7", "pyproject.toml")


def test_a_given_config_wins_over_the_search(repo, tmp_path):
    (repo / "pyproject.toml").write_text(SECTION + 'mode = "expand"\n')
    given = tmp_path / "given.toml"
    given.write_text("seed = 5\n")
    shown = settings(invoke(repo / "sub" / "deep" / "m.onnx", "--config", given, "--show-config"))
    assert shown["mode"] == ('"fuse"', "default") and shown["seed"] == ("5", str(given))


def test_find_starts_in_a_folder_given_as_the_model(repo):
    (repo / "sub" / "pyproject.toml").write_text(SECTION + "seed = 1\n")
    assert config.find(None, (repo / "sub" / "deep",)) == repo / "sub" / "pyproject.toml"
    assert config.find(None, (repo / "sub" / "deep" / "m.onnx",)) == repo / "sub" / "pyproject.toml"
    assert config.find(None, (repo / "m.onnx",)) is None  # not above the repository; no ./pyproject.toml


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners")
def test_a_pyproject_another_user_owns_is_passed_by(repo, tmp_path, monkeypatch):
    """A model in a shared folder (/tmp): another user's pyproject.toml above it is not its config."""
    (repo / "sub" / "pyproject.toml").write_text(SECTION + 'mode = "expand"\n')
    (repo / "pyproject.toml").write_text(SECTION + "seed = 3\n")
    me = os.stat(repo / "pyproject.toml").st_uid
    monkeypatch.setattr(os, "getuid", lambda: me if me != 0 else 4321)  # root's files are trusted: be someone
    if me == 0:
        os.chown(repo / "pyproject.toml", 4321, -1)
        os.chown(repo / "sub" / "pyproject.toml", 9876, -1)
    else:
        pytest.skip("needs root to give a file to another user")
    assert config.find(None, (repo / "sub" / "deep" / "m.onnx",)) == repo / "pyproject.toml"


# -- mode ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lines, mode", [('mode = "expand"', "expand"), ('mode = "fuse"', "fuse"),
                                         ("expand = true", "expand"), ("fuse = true", "fuse"),
                                         ('mode = "expand"\nexpand = true', "expand")])
def test_the_mode_key_and_the_old_flags_where_unambiguous(repo, lines, mode):
    (repo / "pyproject.toml").write_text(SECTION + lines + "\n")
    result = invoke(repo / "sub" / "deep" / "m.onnx", "--check")
    assert header(result) == mode
    assert result.exit_code == (1 if mode == "fuse" else 0)  # one fusable pattern; nothing to expand


@pytest.mark.parametrize("lines, says", [
    ("fuse = true\nexpand = true", "fuse = true and expand = true contradict; set one: mode = \"fuse\" or"),
    ('mode = "fuse"\nexpand = true', "mode = 'fuse' and expand = true contradict"),
    ('mode = "sideways"', "mode = 'sideways': must be \"fuse\" or \"expand\""),
    ("mode = 1", "mode = 1: must be"),
    ("expand = false", "only `expand = true` can be set (it is a flag); better, set mode"),
])
def test_a_mode_that_contradicts_itself_is_one_line_exit_2(repo, lines, says):
    (repo / "pyproject.toml").write_text(SECTION + lines + "\n")
    result = invoke(repo / "sub" / "deep" / "m.onnx", "--check")
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"gconv-rewrite: error: {repo / 'pyproject.toml'}: ") and says in line


def test_the_command_line_wins_over_the_configs_mode(repo):
    (repo / "pyproject.toml").write_text(SECTION + 'mode = "expand"\n')
    assert header(invoke(repo / "sub" / "deep" / "m.onnx", "--check", "--fuse")) == "fuse"


def test_fuse_and_expand_together_are_a_usage_error(repo):
    model = repo / "sub" / "deep" / "m.onnx"
    for flags in (["--fuse", "--expand"], ["--expand", "--check", "--fuse"]):
        result = invoke(model, *flags)
        assert result.exit_code == 2 and "--fuse and --expand are exclusive" in result.stderr
    assert header(invoke(model, "--expand", "--expand", "--check")) == "expand"


# -- the command line's forms ---------------------------------------------------------------------------


@pytest.mark.parametrize("line", ['shape = "x=1,8,6,6"', 'shape = ["x=1,8,6,6"]', "shape = {x = [1, 8, 6, 6]}"])
def test_shape_takes_the_command_lines_string_and_the_list(repo, line):
    (repo / "pyproject.toml").write_text(SECTION + line + "\n")
    model = repo / "sub" / "deep" / "m.onnx"
    assert settings(invoke(model, "--show-config"))["shape"] == ('["x=1,8,6,6"]', str(repo / "pyproject.toml"))
    result = invoke(model, "-o", repo / "out.onnx")
    assert result.exit_code == 0, result.output
    assert op_counts(onnx.load(repo / "out.onnx")) == {"Conv": 1}


def test_the_config_is_read_as_utf8_whatever_the_locale(repo):
    """LC_ALL=C without Python's UTF-8 mode or locale coercion: the locale's encoding is ASCII."""
    (repo / "pyproject.toml").write_bytes((SECTION + 'signature = "sérvé"\n').encode("utf-8"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0",
           "PYTHONCOERCECLOCALE": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("PYTHONIOENCODING", None)
    done = subprocess.run([sys.executable, "-m", "gconv_rewrite", str(repo / "sub" / "deep" / "m.onnx"), "--show-config"],
                          env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f'signature = {json.dumps("sérvé")}  # {repo / "pyproject.toml"}' in done.stdout.decode("ascii")
    (repo / "pyproject.toml").write_bytes((SECTION + 'signature = "sérvé"\n').encode("latin-1"))
    result = invoke(repo / "sub" / "deep" / "m.onnx", "--check")
    assert result.exit_code == 2 and "not UTF-8 text" in result.stderr


# -- options that do nothing here ---------------------------------------------------------------------


def warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("gconv-rewrite: warning: ")]


def test_options_that_do_nothing_are_warned_about(repo):
    model = repo / "sub" / "deep" / "m.onnx"
    result = invoke(model, "--check", "--keep-depthwise", "--min-groups", "4", "--signature", "other",
                    "--threads", "2", "--force")
    assert result.exit_code == 1  # the run itself is unchanged
    assert warnings(result) == [
        "gconv-rewrite: warning: --keep-depthwise ignored: it applies with --expand only",
        "gconv-rewrite: warning: --min-groups ignored: it applies with --expand only",
        "gconv-rewrite: warning: --signature ignored: it applies to SavedModel inputs (and --to savedmodel / "
        "tflite) only",
        "gconv-rewrite: warning: --threads ignored: it sets the threads --benchmark and --auto time with, and "
        "neither is given",
        "gconv-rewrite: warning: --force ignored: --check and --dry-run write nothing",
    ]
    expand = invoke(model, "--expand", "--no-fold-bn", "--no-verify", "--atol", "0.1", "-o", repo / "e.onnx")
    assert expand.exit_code == 0
    assert warnings(expand) == ["gconv-rewrite: warning: --no-fold-bn ignored: it applies with --fuse only",
                                "gconv-rewrite: warning: --atol ignored: --no-verify turns the verification off"]


def test_what_applies_is_not_warned_about_and_quiet_silences_warnings(repo):
    model = repo / "sub" / "deep" / "m.onnx"
    assert warnings(invoke(model, "--check", "--expand", "--keep-depthwise", "--min-groups", "4")) == []
    assert warnings(invoke(model, "--check", "--no-fold-bn", "--atol", "0.1")) == []
    quiet = invoke(model, "--check", "--keep-depthwise", "-q")
    assert quiet.exit_code == 1 and quiet.stderr == ""


def test_a_configs_setting_that_does_nothing_names_the_config(repo):
    (repo / "pyproject.toml").write_text(SECTION + "keep-depthwise = true\nmin-groups = 2\n")
    result = invoke(repo / "sub" / "deep" / "m.onnx", "--check")
    assert warnings(result) == [
        f"gconv-rewrite: warning: --keep-depthwise (set in {repo / 'pyproject.toml'}) ignored: it applies with "
        "--expand only",
        f"gconv-rewrite: warning: --min-groups (set in {repo / 'pyproject.toml'}) ignored: it applies with "
        "--expand only"]
    (repo / "pyproject.toml").write_text(SECTION + "keep-depthwise = false\n")  # off: nothing to ignore
    assert warnings(invoke(repo / "sub" / "deep" / "m.onnx", "--check")) == []


# -- --show-config ------------------------------------------------------------------------------------


def test_show_config_prints_each_setting_and_where_it_came_from_and_runs_nothing(repo):
    (repo / "pyproject.toml").write_text(SECTION + 'mode = "expand"\natol = 0.5\nshape = "x=1,8,6,6"\n')
    result = invoke(repo / "sub" / "deep" / "m.onnx", "--show-config", "--rtol", "0.125", "-o", repo / "o.onnx")
    assert result.exit_code == 0 and result.stderr == ""
    shown = settings(result)
    source = str(repo / "pyproject.toml")
    assert shown["mode"] == ('"expand"', source) and shown["atol"] == ("0.5", source)
    assert shown["rtol"] == ("0.125", "command line")
    assert shown["output"] == (json.dumps(str(repo / "o.onnx")), "command line")
    assert shown["seed"] == ("0", "default") and shown["verify"] == ("true", "default")
    assert "show-config" not in shown and "config" not in shown and "models" not in shown
    assert list(shown).count("mode") == 1
    assert not (repo / "o.onnx").exists() and sorted(p.name for p in (repo / "sub" / "deep").iterdir()) == ["m.onnx"]
