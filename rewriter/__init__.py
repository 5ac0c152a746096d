"""gconv-rewrite: fuse hand-made grouped convolutions into native ones (and back), proven by execution."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("gconv-rewrite")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from rewriter.api import Options, Result, check, expand, fuse, rewrite, verify  # noqa: E402
from rewriter.errors import BadInput, RewriteError, VerificationFailed, VerificationImpossible  # noqa: E402

__all__ = ["Options", "Result", "check", "expand", "fuse", "rewrite", "verify",
           "BadInput", "RewriteError", "VerificationFailed", "VerificationImpossible", "__version__"]
