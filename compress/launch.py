"""The ``compress`` console command's entry point: choose the memory allocator, then run the CLI.

The driver's chunked block forward allocates and frees gigabytes of same-shaped activations per block while
other chunks' activations stay parked at a group boundary. glibc's malloc serves that badly either way:
with its default dynamic mmap threshold the per-thread heaps fragment (peak RSS 4.4 GiB for a 1.55 GiB live
set on SmolLM2-135M), and with a fixed threshold every such block is a fresh mapping the kernel page-faults
and zeroes (about a quarter of the forward's time). tcmalloc and jemalloc reuse freed blocks of the same
size without either cost. When one of them is installed and not already loaded, the command re-executes
itself once with it in ``LD_PRELOAD``, as torch's own ``torch.backends.xeon.run_cpu`` launcher does;
otherwise it keeps glibc with the fixed threshold. ``COMPRESS_ALLOCATOR=glibc`` opts out.

Nothing heavy is imported here, so the re-execution costs milliseconds.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

ENV = "COMPRESS_ALLOCATOR"
LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libjemalloc.so.2")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_allocator() -> str | None:
    """Path of an installed tcmalloc or jemalloc shared library, or ``None``."""
    prefix = Path(sys.prefix) / "lib"
    for name in LIBRARIES:
        for folder in (prefix, *map(Path, LIBRARY_DIRS)):
            if (folder / name).is_file():
                return str(folder / name)
    return None


def _preloaded() -> bool:
    return any(name.split(".so")[0] in os.environ.get("LD_PRELOAD", "") for name in LIBRARIES)


def _glibc_fixed_mmap_threshold() -> None:
    """glibc only: blocks of 1 MiB and more are mapped and unmapped (no fragmentation, page faults instead)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: its allocator is left as it is


def main() -> None:
    choice = os.environ.get(ENV, "auto")
    if sys.platform.startswith("linux") and choice == "auto" and not _preloaded():
        library = find_allocator()
        if library is not None:
            env = {**os.environ, "LD_PRELOAD": " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")])),
                   ENV: "preloaded"}
            os.execve(sys.executable, [sys.executable, "-m", "compress.cli", *sys.argv[1:]], env)
    if sys.platform.startswith("linux") and not _preloaded():
        _glibc_fixed_mmap_threshold()
    from compress.cli import main as cli_main

    cli_main()
