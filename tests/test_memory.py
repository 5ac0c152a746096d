"""gconv_rewrite.memory: the collector's two modes for big models (paused for onnx-ir graphs, the heap
frozen for Keras runs, whose conversions leave cyclic garbage that must still be collected)."""

from __future__ import annotations

import gc
import weakref

from gconv_rewrite.memory import frozen_heap, paused_gc


class _Node:
    def __init__(self):
        self.me = self  # a cycle: only the collector frees it


def test_frozen_heap_still_collects_what_the_run_made_and_unfreezes():
    before = _Node()
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        made = _Node()
        gone = weakref.ref(made)
        del made
        gc.collect()
        assert gone() is None  # garbage made inside is collected
        kept = weakref.ref(before)
    assert gc.get_freeze_count() == 0
    del before
    gc.collect()
    assert kept() is None  # what was frozen is the collector's again


def test_frozen_heap_leaves_someone_elses_freeze_alone():
    gc.freeze()
    try:
        count = gc.get_freeze_count()
        with frozen_heap():
            pass
        assert gc.get_freeze_count() == count
    finally:
        gc.unfreeze()


def test_paused_gc_restores_the_collector():
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
