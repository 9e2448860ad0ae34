"""Build the C++ kernels on first use (``torch.utils.cpp_extension``, ninja) into a cache folder, and load them.

The build takes a minute once per machine and torch version; later runs load the cached library. Without a
C++ compiler (or when the build fails) ``ops()`` returns ``None`` after one warning, and callers use the
pure-torch reference in ``kernels.reference``. ``COMPRESS_KERNELS=reference`` skips the extension on purpose.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "cpu" / name
           for name in ("kernels.cpp", "int8_dot.cpp", "int8_sparse24.cpp", "int8_input_major.cpp", "attention.cpp")]
HEADERS = [Path(__file__).parent / "cpu" / name for name in ("isa.h", "int8_rows.h")]
NAME = "compress_kernels"
# -fopenmp: at::parallel_for's OpenMP pragma is compiled into the extension; without it the kernels run on one thread
CFLAGS = ["-O3", "-fopenmp"]


def cache_dir() -> Path:
    """``$COMPRESS_CACHE`` or ``~/.cache/compress``, then ``kernels/<torch version>-<source hash>``."""
    import compress

    root = compress.cache_dir()
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + " ".join(CFLAGS).encode()).hexdigest()[:12]
    return root / "kernels" / f"torch-{torch.__version__}-{digest}"


@functools.lru_cache(maxsize=1)
def ops():
    """``torch.ops.compress_kernels`` (building it if needed), or ``None`` when it cannot be built."""
    if os.environ.get("COMPRESS_KERNELS") == "reference":
        return None
    if hasattr(torch.ops, NAME) and hasattr(getattr(torch.ops, NAME), "isa"):
        return _traceable(getattr(torch.ops, NAME))
    try:
        from torch.utils import cpp_extension

        if shutil.which(os.environ.get("CXX", "c++")) is None:
            raise RuntimeError("no C++ compiler (c++) on PATH")
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        built = folder / f"{NAME}.so"
        if built.is_file():
            # The folder is named after the sources' content: load what is there. (cpp_extension.load would
            # rebuild, ~15 s, whenever the same sources are read from another path, e.g. another checkout.)
            try:
                torch.ops.load_library(str(built))
                return _traceable(getattr(torch.ops, NAME))
            except OSError as err:  # e.g. a build killed while linking
                log.warning("the cached kernels %s do not load (%s); rebuilding them", built, str(err).splitlines()[0])
                built.unlink()
        log.info("compiling compress's CPU kernels into %s (once per machine and torch version, about a minute)", folder)
        cpp_extension.load(name=NAME, sources=[str(p) for p in SOURCES], build_directory=str(folder),
                           extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], is_python_module=False,
                           verbose=False)
    except Exception as err:  # noqa: BLE001 - any build failure means: use the reference path
        warnings.warn(f"compress's CPU kernels are unavailable ({str(err).splitlines()[0][:200]}); "
                      "using the slower pure-torch reference", RuntimeWarning, stacklevel=2)
        return None
    return _traceable(getattr(torch.ops, NAME))


_FAKES_REGISTERED = False


def _traceable(lib):
    """``lib``, with shape-only (fake) versions of its tensor ops registered once, so that torch.compile can
    trace a model whose linears call them (``compress generate --compile``)."""
    global _FAKES_REGISTERED
    if not _FAKES_REGISTERED:
        def rows(x, *args):  # (batch, in) -> (batch, out); ``out`` is the second-to-last argument
            return x.new_empty(x.shape[0], args[-2])

        for op in ("q4_dense_mm", "q4_sparse24_mm", "q4_input_major_mm"):
            torch.library.register_fake(f"{NAME}::{op}")(rows)
        torch.library.register_fake(f"{NAME}::q4_dense_i8_mm")(
            lambda x, data, scale, zero, out, group, levels=1: x.new_empty(x.shape[0], out))
        torch.library.register_fake(f"{NAME}::q4_sparse24_i8_mm")(
            lambda x, data, pos, scale, zero, out, group, levels=1: x.new_empty(x.shape[0], out))
        torch.library.register_fake(f"{NAME}::q4_input_major_i8_mm")(
            lambda x, data, scale, zero, out, group, levels=1: x.new_empty(x.shape[0], out))
        torch.library.register_fake(f"{NAME}::act_sparse_mm")(lambda x, wt: x.new_empty(x.shape[0], wt.shape[1]))
        torch.library.register_fake(f"{NAME}::q4_unpack")(
            lambda data, pos, scale, zero, out, group: scale.new_empty(out, data.shape[1] * (4 if pos is not None else 2)))
        torch.library.register_fake(f"{NAME}::q4_input_major_unpack")(
            lambda data, scale, zero, out, group: scale.new_empty(out, scale.shape[0] * group))
        torch.library.register_fake(f"{NAME}::decode_attention")(lambda q, *args: q.new_empty(q.shape))
        _FAKES_REGISTERED = True
    return lib
