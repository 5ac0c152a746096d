"""The rewrites, one module each, grouped by format, with a registry of named passes.

Names are what ``--only``-style options and reports use; registering a name twice is an error
so two passes can never shadow each other.
"""

from __future__ import annotations

from collections.abc import Callable

PASS_REGISTRY: dict[str, Callable] = {}


def register(name: str):
    def decorate(factory):
        if name in PASS_REGISTRY:
            raise ValueError(f"pass {name!r} is registered twice")
        PASS_REGISTRY[name] = factory
        factory.pass_name = name
        return factory

    return decorate


def registered(name: str) -> Callable:
    """The pass registered as ``name`` (its module must be imported: each backend imports its own)."""
    try:
        return PASS_REGISTRY[name]
    except KeyError:
        raise KeyError(f"no pass {name!r} (registered: {', '.join(sorted(PASS_REGISTRY))})") from None
