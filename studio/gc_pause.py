"""Fewer passes of Python's cyclic garbage collector during bulk work.

By default a collection runs every 700 net allocations, and every tenth of them walks the older objects too: a
catalog scan or an index rebuild that keeps ~10^6 small objects alive (module records, tensors' Python wrappers,
metadata) spent 15-20 % of its time there (10 000 LoRA files: a scan worker 7.5 ms per file against 6.1; the
index rebuild 14.6 s against 12.9). Reference counting still frees everything that is not in a cycle at once; the
cycles left are collected when the work ends, or at the rarer passes.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager

BULK_THRESHOLD = 100_000   # allocations between the youngest generation's collections during bulk work


def bulk_gc_thresholds() -> None:
    """For a worker process that only does bulk work: rarer collections from now on, and what exists now (modules,
    models) left out of them for good (`gc.freeze`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(BULK_THRESHOLD, *gc.get_threshold()[1:])


@contextmanager
def rare_collections():
    """Within: the youngest generation is collected every `BULK_THRESHOLD` allocations instead of every 700."""
    old = gc.get_threshold()
    gc.set_threshold(max(old[0], BULK_THRESHOLD), *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)
