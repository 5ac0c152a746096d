"""gconv-rewrite: fuse hand-made grouped convolutions into native ones (and back), proven by execution.

The public names are loaded on first use (PEP 562): a pass that imports ``gconv_rewrite.candidate``
runs this file, and must not load the driver (``gconv_rewrite.api``) with it.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING

try:
    __version__ = _version("gconv-rewrite")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

# The library prints nothing: its modules log under "gconv_rewrite.*" (the passes too), which reach a
# handler only where the application configured one (the CLI does, on stderr).
logging.getLogger(__name__).addHandler(logging.NullHandler())

# public name → the module that defines it
_PUBLIC = {
    **dict.fromkeys(("Options", "Result", "check", "expand", "fuse", "rewrite", "verify"), "gconv_rewrite.api"),
    **dict.fromkeys(("RewriteError", "BadInput", "OutputError", "VerificationFailed", "VerificationImpossible"),
                    "gconv_rewrite.errors"),
    "ConfigError": "gconv_rewrite.config",  # a BadInput: a setting in pyproject.toml that cannot be used
}

__all__ = [*_PUBLIC, "__version__"]

if TYPE_CHECKING:  # for type checkers and editors: the names as if imported here
    from gconv_rewrite.api import Options, Result, check, expand, fuse, rewrite, verify  # noqa: F401
    from gconv_rewrite.config import ConfigError  # noqa: F401
    from gconv_rewrite.errors import (  # noqa: F401
        BadInput,
        OutputError,
        RewriteError,
        VerificationFailed,
        VerificationImpossible,
    )


# ``verify`` names both a submodule (rewriter/verify.py) and the API's function. Importing the
# submodule sets the package's attribute to it, after which ``__getattr__`` is never asked; so it
# is imported here first (it loads no driver) and the attribute dropped: ``gconv_rewrite.verify`` is the
# function, as it was when this file imported the API eagerly.
importlib.import_module("gconv_rewrite.verify")
del verify  # bound by the import above, as the submodule


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:  # a submodule (``from gconv_rewrite import formats``) is imported by Python itself
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
