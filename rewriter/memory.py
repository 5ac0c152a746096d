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


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Everything alive on entry (TensorFlow and Keras alone are a million objects) is moved out
    of the collector's sight for the duration: its full collections then walk only what the run
    made. Unlike a paused collector, garbage made inside is still collected (a SavedModel export
    and tf2onnx leave gigabytes of it). Left alone when someone else froze objects already:
    unfreezing would return theirs too."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
