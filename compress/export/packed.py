"""compress's own packed layouts (``kernels.formats``) for its CPU kernels, listed under ``packed`` in
compression.json; ``--quant-lm-head`` rounds lm_head onto the recipe's grid."""

from __future__ import annotations

import torch

from compress.pruning.masks import satisfies_nm


def _packed_state(name: str, packed) -> dict[str, torch.Tensor]:
    """A ``kernels.formats`` layout's tensors as stored for linear ``name``: ``name.packed_<part>``."""
    from compress.kernels.formats import PARTS

    return {f"{name}.packed_{part}": getattr(packed, part) for part in PARTS if getattr(packed, part, None) is not None}


def pack_state(state: dict[str, torch.Tensor], quantized: dict,
                    input_major: set[str] = frozenset()) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """``state`` with each quantized linear's weight replaced by the kernels' layout of it, and per linear its
    layout: ``Q4InputMajor`` for the linears in ``input_major`` (those with activation thresholds: the kernel
    skips the weights of zeroed inputs), else ``Q4Sparse24`` when every run of 4 inputs holds at most 2
    non-zero weights, else ``Q4Dense``."""
    from compress.kernels.formats import Q4Dense, Q4InputMajor, Q4Sparse24

    state, layers = dict(state), {}
    for name, q in quantized.items():
        grid, codes = q.grid, q.codes  # (codes held as nibbles are unpacked once)
        nonzero = grid.decode(codes) != 0
        is_24 = nonzero.shape[1] % 8 == 0 and satisfies_nm(nonzero, 2, 4)  # the kernel reads 8 inputs at a time
        layout = Q4InputMajor if name in input_major else Q4Sparse24 if is_24 else Q4Dense
        packed = layout.pack(codes, grid.scale, grid.zero, grid.group_size)
        del state[f"{name}.weight"]
        state.update(_packed_state(name, packed))
        layers[name] = {"layout": layout.__name__, "shape": list(packed.shape), "group_size": grid.group_size}
    return state, layers


def lm_head_names(model, state: dict[str, torch.Tensor]) -> tuple[str, str, bool]:
    """``(output head, input embedding, tied)`` module names; tied: the head's weight is not in ``state``
    (tied weights are stored once, under the embedding's name)."""
    names = {id(m): n for n, m in model.named_modules()}
    head_name = names[id(model.get_output_embeddings())]
    return head_name, names[id(model.get_input_embeddings())], f"{head_name}.weight" not in state


def quantize_lm_head(model, state: dict[str, torch.Tensor], recipe, fmt: str) -> dict | None:
    """Round the output projection to ``recipe.quant``'s grid in ``state`` (the weights outside the blocks,
    tied ones stored once): dequantized for ``dense``, the ``Q4Dense`` layout for ``packed``. Returns the
    packed table's entry (``tied_embedding``: the input embedding that shares it), or ``None``."""
    from compress.kernels.formats import PACKED_SCALE_DTYPE, Q4Dense
    from compress.quant.grid import QuantGrid

    head_name, embedding_name, tied = lm_head_names(model, state)
    key = f"{embedding_name}.weight" if tied else f"{head_name}.weight"
    W = state[key]
    grid = QuantGrid.fit(W.float(), recipe.quant, scale_dtype=PACKED_SCALE_DTYPE if fmt == "packed" else W.dtype)
    codes = grid.quantize(W.float())
    if fmt != "packed":
        state[key] = grid.decode(codes).to(W.dtype)
        return None
    packed = Q4Dense.pack(codes, grid.scale, grid.zero, grid.group_size)
    del state[key]
    state.update(_packed_state(head_name, packed))
    return {head_name: {"layout": "Q4Dense", "shape": list(packed.shape), "group_size": grid.group_size,
                        "tied_embedding": embedding_name if tied else None}}
