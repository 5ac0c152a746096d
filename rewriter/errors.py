"""Typed errors: each carries the one-line message a user sees and the exit code the CLI returns.

Library code raises these; only the CLI prints them.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # verification failed, or --check found work
EXIT_BAD_INPUT = 2  # bad input or usage


class RewriteError(Exception):
    """Base class: a failure explained in one line, with the exit code to use."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadInput(RewriteError):
    """The model, an option, or a file named on the command line cannot be used."""


class VerificationImpossible(RewriteError):
    """The models cannot be run to compare them (unknown ops, dynamic shapes...)."""


class VerificationFailed(RewriteError):
    """The rewritten model computes something else than the original."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, verification=None):
        super().__init__(message)
        self.verification = verification


class OutputError(RewriteError):
    """The output cannot be written (exists, unwritable folder, disk full...)."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type where it has none), for a one-line error."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
