"""Writing and reading output folders. Every write goes to a temporary sibling folder renamed into place,
so a failed run never leaves a half-written output nor touches an existing one."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)

METADATA = "compression.json"


class OutputError(ValueError):
    """The output folder cannot be written as asked."""


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite`` (checked before any work is done)."""
    if out.exists() and not overwrite:
        raise OutputError(f"output folder {str(out)!r} exists: pass --overwrite or choose another --out")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {str(out)!r} exists and is not a folder: choose another --out")


@contextmanager
def atomic_folder(out: Path, overwrite: bool = False):
    """Yield a temporary folder next to ``out``; on success it replaces ``out``, on error it is removed."""
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def versions() -> dict:
    import transformers

    import compress

    return {"compress": compress.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def save_dense(model, tokenizer, out: Path, metadata: dict, overwrite: bool = False) -> Path:
    """Save ``model`` as ordinary safetensors (loads with ``AutoModelForCausalLM``), its tokenizer and
    ``compression.json`` holding ``metadata`` plus library versions. Tied weights stay tied."""
    with atomic_folder(Path(out), overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / METADATA).write_text(json.dumps({**metadata, "versions": versions()}, indent=2) + "\n")
    log.info("wrote %s", out)
    return Path(out)


def read_metadata(folder: Path) -> dict | None:
    path = Path(folder) / METADATA
    return json.loads(path.read_text()) if path.is_file() else None


def iter_weights(folder: Path):
    """Yield ``(name, tensor)`` for every tensor in the folder's safetensors files, one at a time."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise OutputError(f"{str(folder)!r} holds no .safetensors files: pass a folder written by compress or save_pretrained")
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)


def sparsity_table(folder: Path) -> list[dict]:
    """Per 2-D weight of a saved folder: name, shape, fraction of zeros, whether it sits in a numbered
    (decoder) block, and the tightest N:M (of 2:4, 4:8) that every row satisfies along its last dimension,
    read from the weights themselves."""
    rows = []
    for name, t in iter_weights(folder):
        if t.ndim != 2 or not name.endswith("weight"):
            continue
        nz = t != 0
        rows.append({"name": name, "shape": list(t.shape), "sparsity": 1 - float(nz.float().mean()),
                     "in_block": any(part.isdigit() for part in name.split(".")),
                     "nm": next((f"{n}:{m}" for n, m in ((2, 4), (4, 8)) if _satisfies_nm(nz, n, m)), "")})
    return rows


def _satisfies_nm(nonzero: torch.Tensor, n: int, m: int) -> bool:
    rows, cols = nonzero.shape
    return cols % m == 0 and bool((nonzero.reshape(rows, cols // m, m).sum(-1) <= n).all())
