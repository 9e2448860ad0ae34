"""Writing and reading model folders in compress's formats (dense, compressed-tensors, packed); where and how
safely a folder is written is ``outputs``' concern."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from compress.outputs import METADATA, RESUME_STATE, OutputError, finish_state, versions

log = logging.getLogger(__name__)


def _write_extras(tmp: Path, tokenizer, metadata: dict, act_thresholds: dict | None, gate_space: dict | None = None,
                  act_edges: tuple[int, ...] = ()) -> None:
    from safetensors.torch import save_file

    from compress.activations.thresholds import THRESHOLDS_FILE

    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if act_thresholds:
        save_file({name: t.contiguous().float() for name, t in act_thresholds.items()}, str(tmp / THRESHOLDS_FILE),
                  metadata={"gate_space": json.dumps(gate_space or {}), "position_bands": json.dumps(list(act_edges))})
    (tmp / METADATA).write_text(json.dumps({**metadata, "versions": versions()}, indent=2) + "\n")


FORMATS = ("dense", "compressed-tensors", "packed")
CT_GROUP_SIZES = (32, 64, 128)  # what vLLM's compressed-tensors W4A16/W8A16 kernels take (or per channel)
CT_BITS = (4, 8)


def check_format(fmt: str, recipe, model=None) -> None:
    """Refuse, before any work, an output format that cannot hold ``recipe`` (a ``config.Recipe``).

    Raises:
        OutputError: naming the value and the fix.
    """
    if fmt not in FORMATS:
        raise OutputError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if recipe.quant_lm_head and fmt == "compressed-tensors":
        raise OutputError("--quant-lm-head is not written in the compressed-tensors format yet: use --format packed or dense")
    if fmt == "packed":
        quant = recipe.quant
        if quant is None or quant.bits != 4:
            raise OutputError("--format packed stores 4-bit group-quantized weights for compress's kernels: add "
                              "--quant w4g128 (or w4g64), or use --format dense")
        if quant.group_size and quant.group_size % 8:
            raise OutputError(f"--format packed: the kernels take group sizes divisible by 8, not "
                              f"{quant.group_size}: use --quant w4g64 or w4g128")
        _check_linear_modules(fmt, recipe, model)
        return
    if fmt != "compressed-tensors":
        return
    quant = recipe.quant
    if quant is None:
        raise OutputError("--format compressed-tensors stores quantized weights (vLLM dropped sparse formats): "
                          "add --quant w4g128 (or w8), or use --format dense")
    if quant.bits not in CT_BITS:
        raise OutputError(f"--format compressed-tensors: vLLM loads 4 or 8-bit weights, not {quant.bits}: "
                          f"use --quant w4g{quant.group_size or 128} or --format dense")
    if quant.group_size and quant.group_size not in CT_GROUP_SIZES:
        raise OutputError(f"--format compressed-tensors: vLLM takes group sizes {CT_GROUP_SIZES} or per channel, "
                          f"not {quant.group_size}: use --quant w{quant.bits}g64, or --format dense")
    _check_linear_modules(fmt, recipe, model)


def _check_linear_modules(fmt: str, recipe, model) -> None:
    if model is None:
        return
    from compress import models

    prefix, blocks = models.decoder_blocks(model)
    for i, block in enumerate(blocks):
        for name, module in models.linears(block).items():
            full = f"{prefix}.{i}.{name}"
            if not isinstance(module, torch.nn.Linear) and not models.is_ignored(full, recipe.ignore):
                raise OutputError(f"--format {fmt} needs nn.Linear layers; {full} is "
                                  f"{type(module).__name__}: use --format dense")


def storage_bytes(report, fmt: str, dtype: torch.dtype, symmetric: bool = True, sparse24: bool = False) -> dict:
    """Bytes the compressed linears take in ``fmt`` vs the same linears dense in ``dtype`` (the model's);
    ``symmetric``: quantized without zero points; ``sparse24``: 2:4-pruned (``packed`` stores them as
    ``Q4Sparse24``, but for linears with activation thresholds, which are ``Q4InputMajor``: 4 bits a weight)."""
    from compress.kernels.formats import TILE

    size = torch.finfo(dtype).bits // 8
    dense = stored = 0
    for layer in report.layers:
        n_out, n_in = layer.shape
        dense += n_out * n_in * size
        if layer.bits is None or fmt == "dense":
            stored += n_out * n_in * size
            continue
        groups = n_in // layer.group_size
        if fmt == "packed":  # kernels.formats: 16-row tiles, fp32 scales (and unsigned zero points)
            rows = -(-n_out // TILE) * TILE
            stored += rows * n_in * (3 if sparse24 and not layer.act_target else 4) // 8 + rows * groups * 4 * (1 if symmetric else 2)
            continue
        stored += n_out * math.ceil(n_in * layer.bits / 32) * 4 + n_out * groups * size + 2 * 8
        if not symmetric:
            stored += math.ceil(n_out * layer.bits / 32) * groups * 4
    return {"format": fmt, "linears_dense": dense, "linears_stored": stored, "ratio": stored / dense if dense else 1.0}


def _weight_args(quant) -> dict:
    """compressed-tensors' QuantizationArgs of a ``config.QuantConfig``."""
    return {"num_bits": quant.bits, "type": "int", "symmetric": quant.symmetric,
            "strategy": "group" if quant.group_size else "channel", "group_size": quant.group_size or None,
            "dynamic": False, "actorder": "static" if quant.method == "gptq" and quant.actorder else None,
            "block_structure": None,
            "observer": "minmax", "observer_kwargs": {}}


def _ct_tensors(state: dict[str, torch.Tensor], quantized: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``state`` with each quantized linear ``name``'s weight replaced by the compressed-tensors
    ``pack-quantized`` tensors: ``name.weight_packed`` (codes packed into int32 along the input dimension),
    ``name.weight_scale`` ``(out, groups)`` in the model dtype, ``name.weight_shape`` and, when asymmetric,
    ``name.weight_zero_point`` (packed along the output dimension). Pruned weights are zero codes inside the
    packed weights (vLLM dropped sparse formats).

    Args:
        quantized: ``pipeline.QuantizedWeight`` by full module name.
    """
    from compress.kernels.formats import pack_int32

    state = dict(state)
    for name, q in quantized.items():
        grid = q.grid
        del state[f"{name}.weight"]
        state[f"{name}.weight_packed"] = pack_int32(q.codes, grid.bits)
        state[f"{name}.weight_scale"] = grid.scale.to(dtype)
        state[f"{name}.weight_shape"] = torch.tensor(list(q.codes.shape))
        if grid.zero is not None:
            state[f"{name}.weight_zero_point"] = pack_int32(grid.zero.to(torch.int8), grid.bits, dim=0)
    return state


def _packed_state(name: str, packed) -> dict[str, torch.Tensor]:
    """A ``kernels.formats`` layout's tensors as stored for linear ``name``: ``name.packed_<part>``."""
    from compress.kernels.formats import PARTS

    return {f"{name}.packed_{part}": getattr(packed, part) for part in PARTS if getattr(packed, part, None) is not None}


def _packed_tensors(state: dict[str, torch.Tensor], quantized: dict,
                    input_major: set[str] = frozenset()) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """``state`` with each quantized linear's weight replaced by the kernels' layout of it, and per linear its
    layout: ``Q4InputMajor`` for the linears in ``input_major`` (those with activation thresholds: the kernel
    skips the weights of zeroed inputs), else ``Q4Sparse24`` when every run of 4 inputs holds at most 2
    non-zero weights, else ``Q4Dense``."""
    from compress.kernels.formats import Q4Dense, Q4InputMajor, Q4Sparse24

    state, layers = dict(state), {}
    for name, q in quantized.items():
        grid = q.grid
        nonzero = grid.decode(q.codes) != 0
        is_24 = nonzero.shape[1] % 8 == 0 and int(nonzero.reshape(nonzero.shape[0], -1, 4).sum(-1).max()) <= 2
        layout = Q4InputMajor if name in input_major else Q4Sparse24 if is_24 else Q4Dense
        packed = layout.pack(q.codes, grid.scale, grid.zero, grid.group_size)
        del state[f"{name}.weight"]
        state.update(_packed_state(name, packed))
        layers[name] = {"layout": layout.__name__, "shape": list(packed.shape), "group_size": grid.group_size}
    return state, layers


def _quantized_lm_head(model, state: dict[str, torch.Tensor], recipe, fmt: str) -> dict | None:
    """Round the output projection to ``recipe.quant``'s grid in ``state`` (the weights outside the blocks,
    tied ones stored once): dequantized for ``dense``, the ``Q4Dense`` layout for ``packed``. Returns the
    packed table's entry (``tied_embedding``: the input embedding that shares it), or ``None``."""
    from compress.kernels.formats import Q4Dense
    from compress.quant.grid import QuantGrid

    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    head_name, embedding_name = names[id(head)], names[id(embedding)]
    tied = f"{head_name}.weight" not in state
    key = f"{embedding_name}.weight" if tied else f"{head_name}.weight"
    W = state[key]
    grid = QuantGrid.fit(W.float(), recipe.quant, scale_dtype=W.dtype)
    codes = grid.encode(W.float())
    if fmt != "packed":
        state[key] = grid.decode(codes).to(W.dtype)
        return None
    packed = Q4Dense.pack(codes, grid.scale, grid.zero, grid.group_size)
    del state[key]
    state.update(_packed_state(head_name, packed))
    return {head_name: {"layout": "Q4Dense", "shape": list(packed.shape), "group_size": grid.group_size,
                        "tied_embedding": embedding_name if tied else None}}


def _ct_config(model, quantized_names: set[str], recipe) -> dict:
    """The ``quantization_config`` transformers and vLLM read for compressed-tensors ``pack-quantized``."""
    unquantized = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized_names]
    scheme = {"targets": ["Linear"], "format": "pack-quantized", "input_activations": None, "output_activations": None,
              "weights": _weight_args(recipe.quant)}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": scheme}, "ignore": unquantized, "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}}


class StreamedOutput:
    """Writes ``compress prune``'s output as the driver goes (a ``pipeline.BlockIO``): each decoder block is
    read from the source ``checkpoint`` when reached (if the model was opened streamed), written to its own
    shard when compressed (dense safetensors, or compressed-tensors ``pack-quantized``), then dropped from
    memory; ``finish`` adds the weights outside the blocks, the index, config, tokenizer and metadata.
    Neither loading nor saving ever holds the whole model.

    Args:
        folder: the (temporary) output folder.
        checkpoint: a ``checkpoint.Checkpoint`` the model's meta-device blocks are read from, or ``None`` for
            a model in memory.
        fmt: ``dense``, ``compressed-tensors`` or ``packed`` (compress's kernels' layouts, listed under
            ``packed`` in compression.json; ``compress.load`` reads it).
        fingerprint: what a resumed run must match (model files, calibration, recipe, versions).
        save_every: seconds between saves of the resume state (the next block's inputs and the report so far,
            after a block's shard is written); ``None`` never saves one, 0 saves after every block.
    """

    def __init__(self, model, folder: Path, checkpoint=None, fmt: str = "dense", recipe=None,
                 fingerprint: dict | None = None, save_every: float | None = None):
        from compress import models
        from compress.checkpoint import ShardWriter

        self.prefix, blocks = models.decoder_blocks(model)
        self.n_blocks = len(blocks)
        self.folder = Path(folder)
        self.writer = ShardWriter(self.folder, len(blocks))
        self.fingerprint = fingerprint or {}
        self.save_every = save_every
        self._saved_at = time.monotonic()
        self.checkpoint = checkpoint
        self.fmt = fmt
        self.recipe = recipe
        self.dtype = next(iter(model.parameters())).dtype
        self.quantized_names: set[str] = set()
        self.packed_layers: dict[str, dict] = {}  # --format packed: linear name -> layout, shape, group size

    def started(self, model) -> None:
        if self.checkpoint is None:
            return
        for name, module in model.named_modules():  # re-read from the checkpoint by ``finish``
            if name == self.prefix or name.startswith(self.prefix + "."):
                continue
            for key, param in module._parameters.items():
                if param is not None:
                    module._parameters[key] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    def load(self, index: int, block) -> None:
        from compress.checkpoint import load_module

        if self.checkpoint is not None:
            load_module(self.checkpoint, block, f"{self.prefix}.{index}")

    def unload(self, index: int, block) -> None:
        from compress.checkpoint import release

        if self.checkpoint is not None:
            release(block)

    def resume(self):
        """The ``pipeline.BlockState`` saved in the folder by an interrupted run, if any."""
        from safetensors.torch import load_file

        from compress.pipeline import BlockState

        path = self.folder / RESUME_STATE
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        self.quantized_names = set(saved["quantized_names"])
        self.packed_layers = saved["packed_layers"]
        return BlockState.from_parts(saved["state"], load_file(str(path.parent / saved["tensors"])))

    def _save(self, state) -> None:
        """Write the resume state: tensors first, then the JSON naming them (the commit point), then drop
        older tensors."""
        from safetensors.torch import save_file

        folder = (self.folder / RESUME_STATE).parent
        folder.mkdir(exist_ok=True)
        meta, tensors = state.to_parts()
        name = f"state-{state.next_block:05d}.safetensors"
        save_file(tensors, str(folder / f".{name}.partial"))
        os.replace(folder / f".{name}.partial", folder / name)
        saved = {"fingerprint": self.fingerprint, "tensors": name, "state": meta,
                 "quantized_names": sorted(self.quantized_names), "packed_layers": self.packed_layers}
        tmp = folder / ".state.json.partial"
        tmp.write_text(json.dumps(saved) + "\n")
        os.replace(tmp, self.folder / RESUME_STATE)
        for old in folder.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink()
        self._saved_at = time.monotonic()

    def done(self, index: int, block, quantized: dict, block_state=None) -> None:
        from compress.checkpoint import release

        state = {f"{self.prefix}.{index}.{n}": t for n, t in block.state_dict().items()}
        if self.fmt == "compressed-tensors":
            state = _ct_tensors(state, quantized, self.dtype)
            self.quantized_names.update(quantized)
        elif self.fmt == "packed":
            act = self.recipe.act if self.recipe is not None else None
            state, layers = _packed_tensors(state, quantized, {n for n in quantized if act and act.target_for(n)})
            self.packed_layers.update(layers)
        self.writer.write(index, state)
        release(block)
        if (block_state is not None and self.save_every is not None and block_state.next_block < self.n_blocks
                and time.monotonic() - self._saved_at >= self.save_every):
            self._save(block_state)

    def finish(self, model, tokenizer, metadata: dict, act_thresholds: dict | None = None,
               gate_space: dict | None = None, act_edges: tuple[int, ...] = ()) -> None:
        from compress.checkpoint import materialize

        if self.checkpoint is not None:  # as stored, in the dtype the model was opened with
            outside = [n for n in self.checkpoint.names() if not n.startswith(self.prefix + ".")]
            materialize(model, self.checkpoint.read(outside), strict=False)
            model.tie_weights()
        state, seen = {}, set()
        for name, t in model.state_dict().items():
            if not name.startswith(self.prefix + ".") and (t.device, t.data_ptr()) not in seen:  # tied: stored once
                seen.add((t.device, t.data_ptr()))
                state[name] = t.detach().cpu()
        if self.recipe is not None and self.recipe.quant_lm_head:
            self.packed_layers.update(_quantized_lm_head(model, state, self.recipe, self.fmt) or {})
        self.writer.write(self.writer.n_shards - 1, state)
        self.writer.finish()
        model.config.save_pretrained(self.folder)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(self.folder)
        if self.fmt == "compressed-tensors":
            path = self.folder / "config.json"
            config = json.loads(path.read_text())
            config["quantization_config"] = _ct_config(model, self.quantized_names, self.recipe)
            path.write_text(json.dumps(config, indent=2) + "\n")
        if self.fmt == "packed":
            metadata = {**metadata, "packed": self.packed_layers}
        _write_extras(self.folder, tokenizer, metadata, act_thresholds, gate_space, act_edges)
        if self.save_every is not None:  # complete: a kill from here on never recomputes it
            finish_state(self.folder, self.fingerprint)


def read_metadata(folder: Path) -> dict | None:
    """A folder's compression.json, ``None`` if it has none.

    Raises:
        OutputError: the file is not readable JSON.
    """
    path = Path(folder) / METADATA
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise OutputError(f"{path}: damaged ({err}): write the folder again with compress prune") from err


def read_packed_table(folder: Path) -> dict[str, dict] | None:
    """compression.json's ``packed`` table if ``folder`` was written with ``--format packed``."""
    meta = read_metadata(folder) if Path(folder).is_dir() else None
    return (meta or {}).get("packed")


def tensor_index(folder: Path) -> dict[str, Path]:
    """Which safetensors file of ``folder`` holds each tensor name."""
    from safetensors import safe_open

    from compress.checkpoint import read_header

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise OutputError(f"{str(folder)!r} holds no .safetensors files: pass a folder written by compress or save_pretrained")
    index = {}
    for file in files:
        read_header(file)  # a damaged file is named (CheckpointError) before safetensors reads it
        with safe_open(str(file), framework="pt") as fh:
            index.update(dict.fromkeys(fh.keys(), file))
    return index


def read_tensor(index: dict[str, Path], name: str) -> torch.Tensor | None:
    """One tensor by name (memory-mapped read), or ``None`` if the folder has no such tensor."""
    from safetensors import safe_open

    if name not in index:
        return None
    with safe_open(str(index[name]), framework="pt") as fh:
        return fh.get_tensor(name)


def layer_table(folder: Path) -> list[dict]:
    """Per 2-D weight of a saved folder, read from the stored tensors themselves: name, shape, fraction of
    zeros, the tightest N:M (of 2:4, 4:8) every row satisfies, bits per stored value and group size (when
    quantized), bytes on disk, and whether it sits in a numbered (decoder) block.

    Dense weights that were quantized (``--format dense``) take bits and group size from the folder's
    report; compressed-tensors and packed weights are unpacked to count their zeros.
    """
    from compress.kernels.formats import PARTS, unpack_int32
    from compress.kernels.linear import LAYOUTS

    meta = read_metadata(folder) or {}
    quantized_dense = {layer["name"]: layer for layer in meta.get("report", {}).get("layers", []) if layer.get("bits")}
    config_path = Path(folder) / "config.json"
    qconfig = json.loads(config_path.read_text()).get("quantization_config", {}) if config_path.is_file() else {}
    ct_weights = next(iter(qconfig.get("config_groups", {}).values()), {}).get("weights", {}) \
        if qconfig.get("quant_method") == "compressed-tensors" else {}
    packed = meta.get("packed") or {}
    index = tensor_index(folder)
    rows = []
    for name in index:
        if not name.endswith((".weight", ".weight_packed", ".packed_data")):
            continue
        t = read_tensor(index, name)
        if name.endswith(".weight") and t.ndim == 2:
            module, nonzero, nbytes = name[: -len(".weight")], t != 0, t.numel() * t.element_size()
            layer = quantized_dense.get(module)
            bits, group = (layer["bits"], layer["group_size"]) if layer else (torch.finfo(t.dtype).bits, None)
        elif name.endswith(".weight_packed") and ct_weights:
            module = name[: -len(".weight_packed")]
            parts = {suffix: read_tensor(index, f"{module}.{suffix}") for suffix in ("weight_scale", "weight_shape", "weight_zero_point")}
            shape = tuple(int(v) for v in parts["weight_shape"])
            bits = ct_weights["num_bits"]
            group = ct_weights.get("group_size") or shape[1]
            codes = unpack_int32(t, bits, shape)  # (out, in) int8
            zero = torch.zeros_like(codes)
            if parts["weight_zero_point"] is not None:
                zp = unpack_int32(parts["weight_zero_point"], bits, (shape[0], shape[1] // group), dim=0)
                zero = zp.repeat_interleave(group, dim=1)
            nonzero = codes != zero
            nbytes = sum(p.numel() * p.element_size() for p in (t, *parts.values()) if p is not None)
        elif name.endswith(".packed_data") and name[: -len(".packed_data")] in packed:
            module = name[: -len(".packed_data")]
            info = packed[module]
            layout = LAYOUTS[info["layout"]]
            parts = {p: read_tensor(index, f"{module}.packed_{p}") for p in PARTS[1:]}
            if layout.__name__ != "Q4Sparse24":
                del parts["pos"]
            weight = layout(data=t, **parts, shape=tuple(info["shape"]), group_size=info["group_size"])
            nonzero, nbytes, bits, group = weight.unpack() != 0, weight.nbytes, 4, info["group_size"]
            name = f"{module}.weight"
        else:
            continue
        rows.append({"name": name, "shape": list(nonzero.shape), "sparsity": 1 - float(nonzero.float().mean()),
                     "in_block": any(part.isdigit() for part in name.split(".")), "bits": bits, "group_size": group,
                     "bytes": nbytes,
                     "nm": next((f"{n}:{m}" for n, m in ((2, 4), (4, 8)) if _satisfies_nm(nonzero, n, m)), "")})
    return rows


def _satisfies_nm(nonzero: torch.Tensor, n: int, m: int) -> bool:
    rows, cols = nonzero.shape
    return cols % m == 0 and bool((nonzero.reshape(rows, cols // m, m).sum(-1) <= n).all())
