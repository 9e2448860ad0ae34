"""Reuse of large CPU memory blocks while a run allocates the same activation shapes over and over.

The calibration forward allocates and frees gigabytes of same-shaped activations per block. glibc either keeps
freed blocks in per-thread heaps that fragment (peak RSS three times the live set on SmolLM2-135M) or, above
the fixed mmap threshold the CLI sets, returns them to the kernel, so that every new block costs a page fault
per 4 KB (a third of a SparseGPT run's CPU time spent in the kernel, measured). The compiled extension's
caching allocator keeps freed blocks of at least ``min_bytes`` for the next allocation of the same size, up to
``cap`` bytes in all; everything else goes to torch's allocator as before.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

from compress.kernels.build import ops

log = logging.getLogger(__name__)

_active = False  # a reuse_large_blocks context is open


@contextmanager
def reuse_large_blocks(cap: int, min_bytes: int = 1 << 20) -> Iterator[bool]:
    """Within the block, CPU tensors of at least ``min_bytes`` come from (and go back to) a cache of at most
    ``cap`` bytes. Yields whether the cache is active (not without the compiled extension); on exit the cache
    is emptied and torch's allocator restored (tensors still alive keep their own deleter)."""
    kernels = ops() if cap > 0 else None
    if kernels is None:
        yield False
        return
    global _active
    kernels.cpu_cache(cap, min_bytes)
    _active = True
    try:
        yield True
    finally:
        _active = False
        hits, misses, _, _ = kernels.cpu_cache_stats()
        kernels.cpu_cache(0, min_bytes)
        log.debug("large-block cache: %d of %d allocations reused", hits, hits + misses)


def trim() -> None:
    """Free the cached blocks (keeping the cache on), if a cache is active: between stages whose shapes
    differ, so blocks no later allocation will ask for do not sit in memory."""
    if _active:
        ops().cpu_cache_trim()
