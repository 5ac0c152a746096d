"""Defaults from a config file: ``--config FILE``, else the nearest ``pyproject.toml`` with a
``[tool.gconv-rewrite]`` table found upward from the first model (as ruff and black search: from
the model's folder to the repository's root, a folder holding ``.git``, or the filesystem's), else
./pyproject.toml.

The mode is ``mode = "fuse"`` or ``mode = "expand"``; the older ``fuse = true`` / ``expand = true``
are still read where they say one thing. Values take the command line's forms too
(``shape = "x=1,3,224,224"`` as well as a list or a table).

A config file travels with a repository, and the pre-commit hook reads ./pyproject.toml of
whatever repository it runs in, so the file is read as untrusted data:

- it must be a regular file of at most ``MAX_CONFIG_BYTES`` (``/dev/zero``, a FIFO or a huge file
  is refused before anything is read into memory);
- every setting must be a known long flag with a value of that flag's type;
- settings that let the model's code run are refused (``TRUST_SETTINGS``);
- a path setting (``report``, ``html``, ``output``, ``inputs``) is taken relative to the config's folder and
  must stay inside it, so a repository's config cannot make a run write over ``~/.bashrc``.

Every refusal is a ``ConfigError``: one line, exit 2.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any

import click

from gconv_rewrite.errors import BadInput

CONFIG_SECTION = "gconv-rewrite"
PYPROJECT = "pyproject.toml"
# Settings that let the model's own code run (or change what it computes) are a decision about
# trusting one file, made on the command line or in the Python API.
TRUST_SETTINGS = ("trust-lambdas", "repair-late-binding")
# A project's settings fit in a few hundred bytes; the bound keeps /dev/zero-like files out.
MAX_CONFIG_BYTES = 1 << 20
# Parameters a config file may not set: the models themselves, the config, --version.
NOT_SETTINGS = ("models", "config", "version")


class ConfigError(BadInput):
    """The config file cannot be used: unreadable, not TOML, an unknown or untrusted setting."""


MODES = ("fuse", "expand")


def find(given: Path | None, models: tuple[Path, ...] = ()) -> Path | None:
    """The config file of this run: ``--config``; else the nearest pyproject.toml with a
    ``[tool.gconv-rewrite]`` table upward from the first model; else ./pyproject.toml."""
    if given is not None:
        return given
    if models:
        found = search_upward(_start_folder(models[0]))
        if found is not None:
            return found
    return Path(PYPROJECT) if os.path.lexists(PYPROJECT) else None


def _start_folder(model: Path) -> Path:
    path = Path(os.path.abspath(model))
    return path if path.is_dir() else path.parent


def search_upward(folder: Path) -> Path | None:
    """The first pyproject.toml with a ``[tool.gconv-rewrite]`` table in ``folder`` or above it,
    up to the repository's root (a folder holding ``.git``) or the filesystem's. A pyproject.toml
    without the table is passed by, as ruff passes one without ``[tool.ruff]``, and so is one
    another user owns."""
    for candidate_folder in (folder, *folder.parents):
        candidate = candidate_folder / PYPROJECT
        if os.path.lexists(candidate) and not _someone_elses(candidate):
            tool = read_toml(candidate).get("tool", {})
            if isinstance(tool, dict) and CONFIG_SECTION in tool:
                return candidate
        if os.path.lexists(candidate_folder / ".git"):
            return None
    return None


def read_toml(path: Path) -> dict[str, Any]:
    """The parsed file. Only a regular file of bounded size is read: opened without blocking (a
    FIFO would wait for a writer forever), checked on the open descriptor (no race with a rename)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ConfigError(f"{path}: not a regular file; a config file must be a TOML file")
    with os.fdopen(fd, "rb") as file:
        data = file.read(MAX_CONFIG_BYTES + 1)  # st_size may lie (procfs) or the file may grow
    if max(len(data), info.st_size) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file larger than {MAX_CONFIG_BYTES // (1 << 20)} MiB; "
                          "a config file holds a few settings")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; a config file must be a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def section(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """The settings: pyproject.toml's ``[tool.gconv-rewrite]`` (none: no settings), else that table
    when the file has one, else the whole file."""
    tool = data.get("tool", {})
    if not isinstance(tool, dict):
        raise ConfigError(f"{path}: 'tool' must be a table")
    if path.name == PYPROJECT:
        settings = tool.get(CONFIG_SECTION, {})
    else:
        settings = tool.get(CONFIG_SECTION, data)
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: [tool.{CONFIG_SECTION}] must be a table of settings")
    return settings


def _someone_elses(path: Path) -> bool:
    """POSIX: a file neither this user nor root owns (another user's /tmp/pyproject.toml above a
    model in /tmp): passed by, as git passes by a repository another user owns."""
    if not hasattr(os, "getuid"):
        return False
    try:
        owner = os.stat(path).st_uid
    except OSError:
        return False  # read_toml says why it cannot be read
    return owner not in (os.getuid(), 0)


def load(ctx: click.Context, given: Path | None, models: tuple[Path, ...] = ()) -> tuple[Path | None, dict[str, Any]]:
    """The config file and its settings as click defaults (parameter name → value); flags win."""
    path = find(given, models)
    if path is None:
        return None, {}
    settings = dict(section(path, read_toml(path)))
    mode = _mode(path, settings)  # takes mode, fuse and expand out of ``settings``
    # Settings are named like the long flags: "atol", "shape", "keep-depthwise", "format"...
    known: dict[str, click.Parameter] = {}
    for param in ctx.command.params:
        for opt in getattr(param, "opts", []):
            if opt.startswith("--") and param.name not in NOT_SETTINGS:
                known[opt[2:]] = param
    defaults = {}
    for key, setting in settings.items():
        if key in TRUST_SETTINGS:
            raise ConfigError(f"{path}: {key!r} may not be set in a config file (it lets the model's code run); "
                              f"give --{key} on the command line for the files you trust")
        if key not in known:
            raise ConfigError(f"{path}: unknown setting {key!r} (known: {', '.join(sorted(known))})")
        param = known[key]
        defaults[param.name] = _value(ctx, path, key, param, setting)
    if mode is not None:
        defaults["mode"] = mode
    return path, defaults


def _mode(path: Path, settings: dict[str, Any]) -> str | None:
    """``mode = "fuse" | "expand"``, or the older ``fuse = true`` / ``expand = true`` where they
    say one thing; both, or ``mode`` and a flag that says otherwise, contradict: refused."""
    said: dict[str, str] = {}
    if "mode" in settings:
        mode = settings.pop("mode")
        if mode not in MODES:
            raise ConfigError(f"{path}: mode = {mode!r}: must be \"fuse\" or \"expand\"")
        said["mode"] = mode
    for flag in MODES:
        if flag in settings:
            value = settings.pop(flag)
            if value is not True:
                raise ConfigError(f"{path}: {flag} = {value!r}: only `{flag} = true` can be set (it is a flag); "
                                  f"better, set mode = \"fuse\" or mode = \"expand\"")
            said[flag] = flag
    if len(set(said.values())) > 1:
        keys = " and ".join(f"mode = {v!r}" if k == "mode" else f"{k} = true" for k, v in said.items())
        raise ConfigError(f"{path}: {keys} contradict; set one: mode = \"fuse\" or mode = \"expand\"")
    return next(iter(said.values()), None)


def _value(ctx: click.Context, path: Path, key: str, param: click.Parameter, setting: Any) -> Any:
    """One setting, checked against its flag's type now (one line naming the file and the key),
    not later by click (a usage block that does not say where the value came from)."""
    if isinstance(param, click.Option) and param.is_flag and not param.is_bool_flag:
        # One of several flags that set one value (--fuse / --expand set the mode): `fuse = true`.
        if setting is not True:
            raise ConfigError(f"{path}: {key} = {setting!r}: only `{key} = true` can be set (it is a flag)")
        return param.flag_value
    if param.name == "shapes" and isinstance(setting, dict):
        setting = [f"{k}={','.join(map(str, v))}" for k, v in setting.items()]
    if param.multiple and isinstance(setting, str):
        setting = [setting]
    if isinstance(param.type, click.Path):
        setting = inside_folder(path, key, setting)
    try:
        param.type_cast_value(ctx, setting)
    except (click.BadParameter, TypeError, ValueError) as exc:
        message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
        raise ConfigError(f"{path}: {key} = {setting!r}: {message}") from None
    return setting


def inside_folder(path: Path, key: str, setting: Any) -> str:
    """A path from the config, relative to the config's folder, refused when it leads outside it
    (``..``, an absolute path, a symlinked folder): a config travels with a repository, and what
    it names must be the repository's own files."""
    if not isinstance(setting, str) or not setting:
        raise ConfigError(f"{path}: {key} must be a path (a string)")
    folder = path.parent
    candidate = folder / setting
    root = folder.resolve()
    if not candidate.resolve().is_relative_to(root):
        raise ConfigError(f"{path}: {key} = {setting!r} leads outside the config's folder {root}; a path in a "
                          f"config file must stay inside its folder (give --{key} on the command line instead)")
    return str(candidate)
