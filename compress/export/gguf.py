"""GGUF, the file llama.cpp (and Ollama, LM Studio) runs: compress's quantized weights written exactly as
compressed, in llama.cpp's block layouts, with the metadata and vocabulary its loader reads.

What is stored how:
- a linear the recipe quantized: symmetric 4-bit -> ``Q4_0``, asymmetric 4-bit -> ``Q4_1``, symmetric 8-bit ->
  ``Q8_0``, for groups of 32·k input weights (the group's scale repeated over its k blocks of 32). The codes
  are the recipe's codes and the scales its scales, which a run writing GGUF rounds to fp16 (``SCALE_DTYPE``)
  as it computes them, so nothing is re-rounded. Q4_1's offset ``m = -(8 + z)·s`` is one more fp16 rounding
  (below 2^-11 of ``m``); there is no other.
- every other 2-D tensor (embeddings, linears the recipe left alone, the output head) in ``--gguf-dtype``
  (F16 by default), 1-D tensors (norms, biases) in F32, as llama.cpp's converter does.
- the llama architecture's q and k projections have their rows reordered for llama.cpp's rotary layout
  (each head's two halves interleaved); codes and scales travel with their rows.

The file is assembled (``assemble``) from the per-block shards a run writes (``StreamedOutput``): the tensor
table comes from the shards' headers, then each shard is read and copied in turn, so a streamed run's memory
bound holds. compress's compression.json travels inside the file as ``compress.compression_json``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch

from compress.outputs import GGUF_METADATA_KEY as METADATA_KEY
from compress.outputs import OutputError

log = logging.getLogger(__name__)

SCALE_DTYPE = torch.float16
GGUF_DTYPES = ("f16", "bf16", "f32", "q8_0")
# transformers' model_type -> (llama.cpp's architecture, q/k rows reordered for its rotary layout)
ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False),
         "qwen3_moe": ("qwen3moe", False)}
EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")  # one expert's linear
BLOCK = 32  # weights per Q4_0 / Q4_1 / Q8_0 block


def quant_type(quant):
    """The GGML type a ``config.QuantConfig``'s linears are stored in (None: not quantized)."""
    from gguf import GGMLQuantizationType as Q

    if quant is None:
        return None
    return Q.Q8_0 if quant.bits == 8 else Q.Q4_0 if quant.symmetric else Q.Q4_1


def check_recipe(recipe, gguf_dtype: str) -> None:
    """Refuse, before any work, a recipe GGUF cannot store exactly, naming the nearest one it can.

    Raises:
        OutputError: one line, the value and the fix.
    """
    if gguf_dtype not in GGUF_DTYPES:
        raise OutputError(f"--gguf-dtype {gguf_dtype!r} is not one of {', '.join(GGUF_DTYPES)}")
    if recipe.act is not None:
        raise OutputError("--format gguf: llama.cpp applies no activation thresholds, so --act-sparsity would be lost: "
                          "drop it, or use --format packed or dense")
    quant = recipe.quant
    if quant is None:
        return
    g = quant.group_size
    near = BLOCK * max(1, round((g or BLOCK) / BLOCK))
    if quant.bits not in (4, 8):
        raise OutputError(f"--format gguf stores 4-bit (Q4_0, Q4_1) or 8-bit (Q8_0) groups, not {quant.bits}-bit: use "
                          f"--quant w4g{near} or w8g{near}, or --format dense")
    if not g or g % BLOCK:
        what = "per-channel scales" if not g else f"groups of {g}"
        raise OutputError(f"--format gguf: llama.cpp's blocks hold {BLOCK} weights with one scale each, so {what} cannot "
                          f"be stored exactly: use --quant w{quant.bits}g{near}")
    if quant.bits == 8 and not quant.symmetric:
        raise OutputError(f"--format gguf: Q8_0 has no zero point, so asymmetric 8-bit cannot be stored: use --quant "
                          f"w8g{g} --quant-sym, or w4g{g} --quant-asym (Q4_1)")


class TensorNames:
    """transformers' parameter names -> llama.cpp's (``blk.N.attn_q.weight``, ...) for one model.

    Raises:
        OutputError: the architecture (or a tensor of it) has no GGUF form compress writes.
    """

    def __init__(self, config):
        import gguf

        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHS:
            raise OutputError(f"--format gguf: architecture {model_type!r} is not written yet (supported: "
                              f"{', '.join(ARCHS)}): use --format dense and llama.cpp's converter")
        self.arch_name, self.rotary_rows = ARCHS[model_type]
        self.arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.arch_name)
        self.map = gguf.TensorNameMap(self.arch, config.num_hidden_layers)
        self.allowed = set(gguf.MODEL_TENSORS[self.arch])
        self.n_head = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_head

    def name(self, hf_name: str) -> str:
        """llama.cpp's name of ``hf_name``; an expert's linear (``...experts.3.gate_proj.weight``) names the
        stacked tensor of its block's experts (``blk.N.ffn_gate_exps.weight``)."""
        expert = EXPERT.fullmatch(hf_name)
        if expert:
            hf_name = f"{expert[1]}.{expert[3]}.weight"  # the converter's merged name
        found = self.map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in self.allowed:
            raise OutputError(f"--format gguf: llama.cpp's {self.arch_name} architecture has no tensor for {hf_name}: "
                              f"use --format dense")
        return found[1]

    def rows(self, gguf_name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` with the row order llama.cpp expects for ``gguf_name``."""
        if self.rotary_rows and gguf_name.rsplit(".", 2)[-2] in ("attn_q", "attn_k"):
            return interleave_halves(t, self.n_head if ".attn_q." in gguf_name else self.n_kv)
        return t


def interleave_halves(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from halves ``(x_0..x_{d/2-1}, y_0..y_{d/2-1})`` (transformers' rotate_half)
    to pairs ``(x_0, y_0, x_1, y_1, ...)`` (GGML's rotary). ``t`` ``(heads·d, ...)``, any trailing shape."""
    rows = t.shape[0]
    return t.reshape(heads, 2, rows // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``(out, k)`` viewed as little-endian bytes ``(out, k, itemsize)``."""
    return t.contiguous().view(torch.uint8).reshape(*t.shape, t.element_size())


def encode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """GGML blocks of a group-quantized matrix, row by row: ``codes`` ``(out, in)`` int8 on the grid ``w = (q -
    z)·s``, ``scale``/``zero`` ``(out, groups)`` with ``in / groups`` a multiple of 32. Returns ``(out, in/32 ·
    B)`` uint8, B the block's bytes: Q8_0 ``[d fp16][q int8 x32]``; Q4_0 ``[d][nibbles]``, Q4_1 ``[d][m][nibbles]``
    where byte j of the 16 holds code j + 8 (low nibble) and code j + 16 + 8 (high)."""
    n_out, n_in = codes.shape
    blocks = n_in // BLOCK
    per_group = n_in // scale.shape[1] // BLOCK
    s = scale.float().repeat_interleave(per_group, dim=1)  # (out, blocks)
    d = _bytes(s.to(torch.float16))  # (out, blocks, 2)
    if bits == 8:
        q = codes.reshape(n_out, blocks, BLOCK).view(torch.uint8)
        return torch.cat([d, q], dim=-1).reshape(n_out, -1)
    nib = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(n_out, blocks, BLOCK)
    packed = nib[..., :BLOCK // 2] | (nib[..., BLOCK // 2:] << 4)  # (out, blocks, 16)
    if zero is None:
        return torch.cat([d, packed], dim=-1).reshape(n_out, -1)
    m = -(8 + zero.float().repeat_interleave(per_group, dim=1)) * s  # nibble·d + m == (q - z)·s
    return torch.cat([d, _bytes(m.to(torch.float16)), packed], dim=-1).reshape(n_out, -1)


def block_state(state: dict[str, torch.Tensor], quantized: dict, names: TensorNames) -> dict[str, torch.Tensor]:
    """One shard's tensors under llama.cpp's names: quantized linears as their GGML blocks (uint8), the rest
    as they are (converted when the file is assembled). ``quantized``: ``QuantizedWeight`` by module name."""
    out, experts = {}, {}
    for hf_name, t in state.items():
        module, _, kind = hf_name.rpartition(".")
        q = quantized.get(module) if kind == "weight" else None
        if q is not None:
            t = encode(q.codes, q.grid.scale, q.grid.zero, q.grid.bits)
        gguf_name = names.name(hf_name)
        if expert := EXPERT.fullmatch(hf_name):  # stacked below, in expert order: (experts, out, in or bytes)
            experts.setdefault(gguf_name, {})[int(expert[2])] = t
        else:
            out[gguf_name] = names.rows(gguf_name, t)
    for gguf_name, by_index in experts.items():
        out[gguf_name] = torch.stack([by_index[e] for e in range(len(by_index))])
    return out


def head_state(model, state: dict[str, torch.Tensor], recipe, names: TensorNames) -> dict[str, torch.Tensor]:
    """``block_state`` for the tensors outside the decoder blocks; with ``--quant-lm-head`` the output head (the
    embedding, when tied) rounded to the recipe's grid with fp16 scales and stored as its blocks."""
    from compress.export.packed import lm_head_names
    from compress.quant.grid import QuantGrid
    from compress.reports import QuantizedWeight

    quantized = {}
    if recipe is not None and recipe.quant_lm_head and recipe.quant is not None:
        head_name, embedding_name, tied = lm_head_names(model, state)
        module = embedding_name if tied else head_name
        W = state[f"{module}.weight"].float()
        grid = QuantGrid.fit(W, recipe.quant, SCALE_DTYPE)
        quantized[module] = QuantizedWeight(grid.quantize(W), grid)
    return block_state(state, quantized, names)


def check_model(model, tokenizer, source: str) -> None:
    """Refuse (after loading, before calibration) a model GGUF cannot hold: an architecture, tensor, rotary
    scaling or tokenizer compress does not write."""
    from compress.experts import per_expert_names
    from compress.export.gguf_vocab import vocabulary

    names = TensorNames(model.config)
    with per_expert_names(model):
        for hf_name in model.state_dict():
            names.name(hf_name)
    config = model.config
    if config.model_type == "qwen3_moe" and (not config.norm_topk_prob or config.mlp_only_layers
                                             or config.decoder_sparse_step != 1):
        raise OutputError("--format gguf: llama.cpp's qwen3moe renormalizes the top-k routing weights in every block "
                          "(norm_topk_prob, no dense-MLP layers); this model differs: use --format dense")
    head_dim = getattr(model.config, "head_dim", None)
    if model.config.model_type == "qwen3" and head_dim not in (None, 128):
        log.warning("--format gguf: llama.cpp reads this Qwen3's head_dim %d from the file, transformers' GGUF reader "
                    "assumes 128 (every released Qwen3), so compress eval cannot read the file back", head_dim)
    _rope(model.config)
    vocabulary(tokenizer, source, model.get_input_embeddings().weight.shape[0])


def _rope(config) -> tuple[float, str, float]:
    """``(base, scaling type, factor)`` of the config's rotary embedding; refuses scalings llama.cpp needs
    more for (``llama3``, ``yarn``, ...)."""
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear"):
        raise OutputError(f"--format gguf: rotary scaling {kind!r} is not written yet: use --format dense and llama.cpp's converter")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0))), kind, float(params.get("factor", 1.0))


def _metadata(writer, config, names: TensorNames, file_type: int) -> None:
    """The architecture's hyperparameters llama.cpp's loader reads."""
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(names.n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    base, kind, factor = _rope(config)
    writer.add_rope_freq_base(base)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if getattr(config, "num_experts", None):
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _file_type(qtype, gguf_dtype: str) -> int:
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    by_type = {Q.Q4_0: F.MOSTLY_Q4_0, Q.Q4_1: F.MOSTLY_Q4_1, Q.Q8_0: F.MOSTLY_Q8_0}
    by_dtype = {"f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "f32": F.ALL_F32, "q8_0": F.MOSTLY_Q8_0}
    return int(by_type[qtype] if qtype is not None else by_dtype[gguf_dtype])


def _storage_type(dtype: str, shape: list[int], qtype, gguf_dtype: str):
    """The GGML type a shard tensor is written in."""
    from gguf import GGMLQuantizationType as Q

    if dtype == "U8":
        return qtype
    if len(shape) == 1:
        return Q.F32
    if gguf_dtype == "q8_0" and shape[-1] % BLOCK:
        return Q.F16  # Q8_0 needs rows of 32·k
    return {"f16": Q.F16, "bf16": Q.BF16, "f32": Q.F32, "q8_0": Q.Q8_0}[gguf_dtype]


def _as_bytes(t: torch.Tensor, ggml_type):
    """A shard tensor as the bytes of its GGML type (numpy uint8)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    if t.dtype == torch.uint8:
        return t.contiguous().numpy()
    if ggml_type == Q.Q8_0:  # a storage choice like F16: llama.cpp's own Q8_0 rounding
        return gguf.quants.quantize(t.float().numpy(), Q.Q8_0)
    dtype = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[ggml_type]
    return _bytes(t.to(dtype)).reshape(*t.shape[:-1], -1).numpy()


def assemble(shards: list[Path], out_file: Path, config, vocab: list[tuple], metadata: dict, qtype,
             gguf_dtype: str) -> None:
    """Write ``out_file`` from ``shards`` (safetensors of llama.cpp-named tensors, ``block_state`` and
    ``head_state``), one shard in memory at a time."""
    import gguf
    import numpy
    from safetensors import safe_open
    from safetensors.torch import load_file

    names = TensorNames(config)
    writer = gguf.GGUFWriter(str(out_file), names.arch_name)
    writer.add_name(str(getattr(config, "_name_or_path", "") or "model").rstrip("/").rsplit("/", 1)[-1] or "model")
    _metadata(writer, config, names, _file_type(qtype, gguf_dtype))
    for key, value, vtype, sub in vocab:
        writer.add_key_value(key, value, vtype, sub)
    writer.add_string(METADATA_KEY, json.dumps(metadata))
    plan = []
    for shard in shards:
        with safe_open(str(shard), framework="pt") as fh:
            for name in sorted(fh.keys()):
                piece = fh.get_slice(name)
                shape, dtype = list(piece.get_shape()), piece.get_dtype()
                ggml_type = _storage_type(dtype, shape, qtype, gguf_dtype)
                block, size = gguf.GGML_QUANT_SIZES[ggml_type]
                byte_shape = shape if dtype == "U8" else [*shape[:-1], shape[-1] // block * size]
                writer.add_tensor_info(name, byte_shape, numpy.uint8, math.prod(byte_shape), raw_dtype=ggml_type)
                plan.append((shard, name, ggml_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    loaded, tensors = None, {}
    for shard, name, ggml_type in plan:
        if shard != loaded:
            tensors, loaded = load_file(str(shard)), shard
        writer.write_tensor_data(_as_bytes(tensors.pop(name), ggml_type))
    writer.close()


def read_metadata(path: Path) -> dict | None:
    """compress's compression.json inside a GGUF file, None when compress did not write it."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get(METADATA_KEY)
    return json.loads(field.contents()) if field is not None else None


def layer_table(path: Path) -> list[dict]:
    """``reading.layer_table``'s rows for a GGUF file: per 2-D tensor its GGML type, shape ``(rows, cols)``,
    zeros and N:M of the dequantized values (llama.cpp's package dequantizes), bits per weight as stored
    (Q4_0: 4.5, the fp16 scale included), group size (32 for the block types) and bytes."""
    import gguf

    from compress.pruning.masks import satisfies_nm

    rows = []
    for t in gguf.GGUFReader(str(path)).tensors:
        if len(t.shape) != 2:
            continue
        block, _ = gguf.GGML_QUANT_SIZES[t.tensor_type]
        nonzero = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)) != 0  # (rows, cols)
        rows.append({"name": t.name, "type": t.tensor_type.name, "shape": list(nonzero.shape),
                     "sparsity": 1 - float(nonzero.float().mean()), "in_block": t.name.startswith("blk."),
                     "bits": round(8 * int(t.n_bytes) / nonzero.numel(), 2), "group_size": block if block > 1 else None,
                     "bytes": int(t.n_bytes),
                     "nm": next((f"{n}:{m}" for n, m in ((2, 4), (4, 8)) if satisfies_nm(nonzero, n, m)), "")})
    return rows


def describe(path: Path) -> dict:
    """What a GGUF file holds, for ``compress eval`` and ``report``: its decoder linears' GGML types (count of
    tensors), bits per weight and share of zeros."""
    rows = [r for r in layer_table(path) if r["in_block"]]
    numel = [r["shape"][0] * r["shape"][1] for r in rows]
    types: dict[str, int] = {}
    for r in rows:
        types[r["type"]] = types.get(r["type"], 0) + 1
    total = sum(numel) or 1
    return {"types": types, "bits_per_weight": 8 * sum(r["bytes"] for r in rows) / total,
            "sparsity": sum(r["sparsity"] * n for r, n in zip(rows, numel)) / total}
