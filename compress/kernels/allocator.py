"""Reuse of large CPU memory blocks while a run allocates the same activation shapes over and over.

The calibration forward allocates and frees gigabytes of same-shaped activations per block. glibc either keeps
freed blocks in per-thread heaps that fragment (peak RSS three times the live set on SmolLM2-135M) or, above
the fixed mmap threshold the CLI sets, returns them to the kernel, so that every new block costs a page fault
per 4 KB (a third of a SparseGPT run's CPU time spent in the kernel, measured). The compiled extension's
caching allocator keeps freed blocks of at least ``min_bytes`` for the next allocation of the same size, up to
``cap`` bytes in all; everything else goes to torch's allocator as before.
"""

from __future__ import annotations

import ctypes
import logging
import sys
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
    """Free the cached blocks (keeping the cache on), if a cache is active, and give glibc's free heap pages
    back to the kernel: between stages whose shapes differ, so memory no later allocation will ask for does
    not sit in the process."""
    if _active:
        ops().cpu_cache_trim()
    release_free_heap()


def return_freed_memory_to_os() -> None:
    """Fix glibc's mmap threshold at 1 MiB for this process.

    glibc serves blocks below a *dynamic* threshold (it climbs to 32 MiB) from per-thread heaps and keeps
    them when freed. The chunked block forward frees gigabytes of same-shaped activations per block while
    other chunks' activations stay parked, and the heaps fragment: peak RSS on SmolLM2-135M was 4.4 GiB for
    a 1.55 GiB live set. A fixed threshold hands such blocks back to the kernel when freed (costs page
    faults, about 20% of the forward's time; ``reuse_large_blocks`` wins most of it back). tcmalloc
    (LD_PRELOAD) fragments as badly: 4.1 GiB peak on six blocks where this gives 1.6 GiB.
    """
    if _glibc is not None:
        _glibc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def release_free_heap() -> None:
    """Hand the free pages inside glibc's heaps back to the kernel (``malloc_trim``): what small objects
    left behind, e.g. the ~50 MiB that tokenizing a calibration text leaves free but resident."""
    if _glibc is not None:
        _glibc.malloc_trim(0)


def _load_glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist (musl has neither)
        return libc
    except (OSError, AttributeError):
        log.debug("not glibc: allocator left as it is")
        return None


_glibc = _load_glibc()
