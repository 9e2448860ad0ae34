"""compressed-tensors' ``pack-quantized`` layout, as vLLM loads it: int32-packed codes, scales, zero points,
and the ``quantization_config`` that config.json carries."""

from __future__ import annotations

import torch


def _weight_args(quant) -> dict:
    """compressed-tensors' QuantizationArgs of a ``config.QuantConfig``."""
    return {"num_bits": quant.bits, "type": "int", "symmetric": quant.symmetric,
            "strategy": "group" if quant.group_size else "channel", "group_size": quant.group_size or None,
            "dynamic": False, "actorder": "static" if quant.method == "gptq" and quant.actorder else None,
            "block_structure": None,
            "observer": "minmax", "observer_kwargs": {}}


def pack_state(state: dict[str, torch.Tensor], quantized: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
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
        state[f"{name}.weight_shape"] = torch.tensor(list(q.shape))
        if grid.zero is not None:
            state[f"{name}.weight_zero_point"] = pack_int32(grid.zero.to(torch.int8), grid.bits, dim=0)
    return state


def quantization_config(model, quantized_names: set[str], recipe) -> dict:
    """The ``quantization_config`` transformers and vLLM read for compressed-tensors ``pack-quantized``."""
    from compress.experts import routers

    unquantized = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized_names]
    unquantized += [n for n in routers(model) if n not in unquantized]  # vLLM's gate linears, kept dense
    scheme = {"targets": ["Linear"], "format": "pack-quantized", "input_activations": None, "output_activations": None,
              "weights": _weight_args(recipe.quant)}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": scheme}, "ignore": unquantized, "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}}
