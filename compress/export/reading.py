"""Reading output folders back: their metadata, tensors by name, and the per-layer table ``compress info``
prints, computed from the stored weights themselves."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.outputs import METADATA, OutputError
from compress.pruning.masks import satisfies_nm


def read_metadata(folder: Path) -> dict | None:
    """A folder's compression.json (or a GGUF file's copy of it), ``None`` if it has none.

    Raises:
        OutputError: the file is not readable JSON.
    """
    if str(folder).endswith(".gguf") and Path(folder).is_file():  # a GGUF carries it inside
        from compress.export.gguf import read_metadata as from_gguf

        return from_gguf(Path(folder))
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
                     "nm": next((f"{n}:{m}" for n, m in ((2, 4), (4, 8)) if satisfies_nm(nonzero, n, m)), "")})
    return rows


def info(folder: Path) -> dict:
    """``compress info``: ``layer_table``'s rows and the totals over the decoder blocks' linears and over every
    2-D weight, with the folder's recipe, format and calibration when compress wrote it.

    Raises:
        OutputError: not a folder (or a .gguf file), or no readable safetensors in it.
        checkpoint.CheckpointError: a damaged file, named.
    """
    is_gguf = str(folder).endswith(".gguf") and Path(folder).is_file()
    if not Path(folder).is_dir() and not is_gguf:
        raise OutputError(f"{str(folder)!r} is not a folder or a .gguf file: pass an output of compress prune")
    if is_gguf:
        from compress.export import gguf

        rows = gguf.layer_table(Path(folder))
    else:
        rows = layer_table(folder)
    meta = read_metadata(folder) or {}

    def numel(row):
        return row["shape"][0] * row["shape"][1]

    linear_rows = [r for r in rows if r["in_block"]]
    total = sum(numel(r) for r in linear_rows) or 1
    return {"layers": rows,
            "block_linears_sparsity": sum(r["sparsity"] * numel(r) for r in linear_rows) / total,
            "all_weights_sparsity": sum(r["sparsity"] * numel(r) for r in rows) / (sum(numel(r) for r in rows) or 1),
            "block_linears_bytes": sum(r["bytes"] for r in linear_rows),
            "block_linears_bits_per_weight": 8 * sum(r["bytes"] for r in linear_rows) / total,
            "recipe": meta.get("recipe"), "summary": meta.get("report", {}).get("recipe"),
            "format": meta.get("format", "dense") if meta else ("gguf" if is_gguf else None),
            "calibration": meta.get("calibration")}
