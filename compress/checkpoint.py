"""Safetensors checkpoints read tensor by tensor, and compressed models written block by block.

Memory is the point. The driver needs one decoder block's weights at a time, so a local safetensors
checkpoint opens as a module tree on the meta device (``open_streamed``) and each block's tensors are read
when the driver reaches it, with plain file reads: a memory map would keep every page it ever touched
resident (and counted) for as long as any tensor of the file lives. A finished block goes straight to its own
output shard (``ShardWriter``) and leaves memory, so neither loading nor saving ever holds the whole model.

Safetensors layout (the format's spec): an 8-byte little-endian header length, a JSON header mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data that follows the
header), an optional ``"__metadata__"`` string map, then the raw little-endian data.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


class CheckpointError(ValueError):
    """A weights file is damaged or does not fit the model: the message names the file and what is wrong."""


def read_header(file: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its data starts.

    Raises:
        CheckpointError: the file is not safetensors, or its data is cut short (``check_file``).
    """
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (size,)
        if n > size - 8:
            raise CheckpointError(f"{file}: truncated or not a safetensors file ({size} bytes, too short for its "
                                  f"header): copy or save it again")
        try:
            header = json.loads(fh.read(n))
        except ValueError as err:
            raise CheckpointError(f"{file}: damaged safetensors header ({err}): copy or save it again") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: damaged safetensors header (not a JSON object): copy or save it again")
    data_end = max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"), default=0)
    if 8 + n + data_end > size:
        raise CheckpointError(f"{file}: truncated: {size} bytes where its header describes {8 + n + data_end}: "
                              f"copy or save it again")
    return header, 8 + n


class Checkpoint:
    """The tensors of a folder's safetensors files (one file, or shards), read on demand into fresh memory."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{str(self.folder)!r} holds no .safetensors files")
        index = self.folder / INDEX_FILE
        if index.is_file():  # the shards the index names, not stray files that happen to sit there
            files = sorted({self.folder / f for f in json.loads(index.read_text())["weight_map"].values()})
            if missing := [f.name for f in files if not f.is_file()]:
                raise CheckpointError(f"{index}: names {missing[0]} (and {len(missing) - 1} more), which is "
                                      f"missing: copy the whole model folder again")
        self.entries: dict[str, _Entry] = {}
        for file in files:
            header, start = read_header(file)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                if info.get("dtype") not in DTYPES:
                    raise CheckpointError(f"{file}: tensor {name!r} has dtype {info.get('dtype')!r}, which compress "
                                          f"does not read: save it as F32, F16 or BF16")
                self.entries[name] = _Entry(file, DTYPES[info["dtype"]], tuple(info["shape"]), start + begin, start + end)

    def names(self) -> set[str]:
        return set(self.entries)

    def read(self, names, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Read tensors ``names`` (floating ones cast to ``dtype`` if given), each file opened once."""
        out = {}
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.entries[name].file, []).append(name)
        for file, file_names in by_file.items():
            try:
                fh = open(file, "rb", buffering=0)
            except OSError as err:
                raise CheckpointError(f"{file}: cannot be read ({err.strerror})") from err
            with fh:
                for name in sorted(file_names, key=lambda n: self.entries[n].begin):
                    e = self.entries[name]
                    t = torch.empty(e.shape, dtype=e.dtype)
                    if t.numel():
                        fh.seek(e.begin)
                        if fh.readinto(t.view(-1).view(torch.uint8).numpy()) != e.end - e.begin:
                            raise CheckpointError(f"{file}: truncated data for tensor {name!r} (the file changed "
                                                  f"since it was opened?): copy or save it again")
                    out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out


def check_shapes(checkpoint: Checkpoint, model: nn.Module) -> None:
    """Refuse a checkpoint whose tensors do not have the shapes ``model`` (built from its config) declares.

    Raises:
        CheckpointError: naming the first tensor, its file, both shapes.
    """
    for name, declared in model.state_dict().items():
        entry = checkpoint.entries.get(name)
        if entry is not None and entry.shape != tuple(declared.shape):
            raise CheckpointError(f"{entry.file}: tensor {name!r} has shape {list(entry.shape)} where config.json "
                                  f"makes it {list(declared.shape)}: the weights and the config belong to different "
                                  f"models")


def load_module(checkpoint: Checkpoint, module: nn.Module, prefix: str) -> None:
    """Read meta-device ``module``'s weights, stored under ``prefix.<name>``, from ``checkpoint``."""
    names = {f"{prefix}.{n}": n for n in module.state_dict()}
    materialize(module, {names[n]: t for n, t in checkpoint.read(names).items()})


def streamable(checkpoint: Checkpoint, model: nn.Module) -> bool:
    """Whether the checkpoint holds every parameter and persistent buffer of ``model`` under its own name
    (tied weights may be stored once), so blocks can be read by name."""
    names = checkpoint.names()
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    return all(n in names or n in tied for n in model.state_dict())


def materialize(module: nn.Module, tensors: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Give a meta-device ``module`` the weights ``tensors`` (by name relative to ``module``; floating ones
    cast to the dtype the module declares); with ``strict``, every parameter and persistent buffer."""
    declared = module.state_dict()
    tensors = {n: t.to(declared[n].dtype) if t.is_floating_point() and n in declared else t for n, t in tensors.items()}
    module.load_state_dict(tensors, assign=True, strict=strict)


def release(module: nn.Module) -> None:
    """Drop ``module``'s weights (to the meta device): its memory returns to the allocator."""
    module.to("meta")


class BlockSource:
    """Decoder blocks of a meta-device model read from ``checkpoint`` when a pass reaches them and dropped
    after: the loading half of a ``pipeline.BlockIO``, for passes that only read the weights (OWL's)."""

    def __init__(self, checkpoint: Checkpoint, prefix: str):
        self.checkpoint = checkpoint
        self.prefix = prefix

    def load(self, index: int, block: nn.Module) -> None:
        load_module(self.checkpoint, block, f"{self.prefix}.{index}")

    def unload(self, index: int, block: nn.Module) -> None:
        release(block)


class ShardWriter:
    """Writes a model as one safetensors shard per decoder block plus one for the rest, with the index
    transformers reads (``model.safetensors.index.json``). Each shard is written under a temporary name
    and renamed, so a shard that exists is complete; the index is built from the shards on disk, so a run
    resumed after a crash indexes the shards its first part wrote too."""

    def __init__(self, folder: Path, n_blocks: int):
        self.folder = Path(folder)
        self.n_shards = n_blocks + 1

    def shard_name(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def write(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write shard ``k`` (block ``k``; ``n_blocks`` for the tensors outside the blocks)."""
        from safetensors.torch import save_file

        name = self.shard_name(k)
        tmp = self.folder / f".{name}.partial"
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.folder / name)

    def finish(self) -> None:
        weight_map, total = {}, 0
        for k in range(self.n_shards):
            header, _ = read_header(self.folder / self.shard_name(k))
            for name, info in header.items():
                if name != "__metadata__":
                    weight_map[name] = self.shard_name(k)
                    total += info["data_offsets"][1] - info["data_offsets"][0]
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
