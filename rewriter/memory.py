"""Python's cyclic garbage collector, paused while big object graphs are built."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic collection inside: a graph of many thousands of nodes or layers is millions of
    live objects, which each full collection walks again while it grows (10-20% of a Keras
    build, more per node as ONNX graphs grow); what is left in cycles is collected once the
    collector runs again after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
