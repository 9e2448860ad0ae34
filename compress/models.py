"""Loading and saving models, and the one place that knows how architectures are laid out.

Everything architecture-specific is derived, not listed: decoder blocks are the ``nn.ModuleList`` holding
``config.num_hidden_layers`` modules; a block's prunable linears are its ``nn.Linear`` and GPT-2 style
``Conv1D`` modules (whose weight is stored transposed, ``(in, out)``).
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """The model cannot be used: the message names it and what to do."""


def check_dtype(dtype: str) -> None:
    """Raises ModelError for a ``--dtype`` that is neither ``auto`` nor one of ``DTYPES``."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU. Raises ModelError for an unavailable device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ModelError(f"--device {device!r} is not a device: use auto, cpu or cuda") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {device} asked for CUDA but torch sees no GPU: use --device cpu")
    return dev


def load(spec: str, dtype: str = "auto"):
    """Load a causal LM and its tokenizer from a hub id, a local folder or a ``.gguf`` file (weights on CPU).

    A GGUF checkpoint is dequantized (to float32 unless ``dtype`` says otherwise) and its quantization
    config dropped, so the model saves as ordinary safetensors.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        ModelError: missing path, not a causal LM, or not loadable.
    """
    from transformers import AutoModelForCausalLM

    check_dtype(dtype)
    path = Path(spec)
    is_gguf = spec.endswith(".gguf")
    check_local(spec)
    kwargs: dict = {}
    if is_gguf:
        where, kwargs["gguf_file"] = str(path.parent), path.name
        torch_dtype = DTYPES.get(dtype, torch.float32)
    else:
        where, torch_dtype = spec, (DTYPES[dtype] if dtype != "auto" else "auto")
    try:
        if path.is_dir() and any(path.glob("*.safetensors")):
            _check_shapes(path)  # before transformers, whose refusal comes after a multi-line report
        tokenizer = tokenizer_of(where, spec, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kwargs)
    except ModelError:
        raise
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ModelError(f"{spec!r} is not a causal LM: compress needs a model AutoModelForCausalLM loads") from err
        raise ModelError(f"cannot load {spec!r}: {str(err).splitlines()[0]}") from err
    except OSError as err:
        where = "" if path.exists() else "no local folder of that name, and the hub: "
        raise ModelError(f"cannot load {spec!r} ({where}{str(err).splitlines()[0]}): check the hub id or pass a "
                         f"local folder") from err
    except pickle.UnpicklingError as err:
        files = ", ".join(sorted(p.name for p in path.glob("*.bin"))) or "its weights"
        raise ModelError(f"{spec!r}: torch's weights-only loader refused the pickle checkpoint {files} "
                         f"({str(err).splitlines()[0].split('. ')[0]}), so none of it ran; compress never runs code from a model "
                         f"folder: convert the weights to safetensors where you trust the file") from err
    except RuntimeError as err:  # e.g. a tensor whose shape the config does not give it
        raise ModelError(f"cannot load {spec!r}: {' '.join(str(err).split())[:300]}") from err
    if is_gguf:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def tokenizer_of(where, spec: str, **kwargs):
    """The tokenizer saved beside ``spec``'s weights.

    Raises:
        ModelError: there is none (transformers then fails, or makes an empty one).
    """
    from transformers import AutoTokenizer

    fix = (f"{spec!r} has no tokenizer (no tokenizer.json or tokenizer_config.json beside the weights): save the "
           f"model's tokenizer into the folder (tokenizer.save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except (ValueError, OSError) as err:
        if Path(spec).is_dir() and not any(Path(spec).glob("tokenizer*")):
            raise ModelError(fix) from err
        raise
    if len(tokenizer) < 2:
        raise ModelError(fix)
    return tokenizer


HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # name or owner/name


def check_local(spec: str) -> None:
    """Refuse, before transformers sees it, a model path that cannot be loaded: a path that does not exist
    (anything that is not a hub id's ``owner/name`` form is a path), a folder without config.json, a damaged
    safetensors file or a file that is not GGUF.

    Raises:
        ModelError: naming the path and the fix.
        checkpoint.CheckpointError: a damaged weights file, named.
    """
    from compress.checkpoint import read_header

    path = Path(spec).expanduser()
    looks_local = spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or not HUB_ID.fullmatch(spec)
    if not path.exists():
        if looks_local:
            raise ModelError(f"model path {spec!r} does not exist: pass a hub id, a model folder or a .gguf file")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec!r} is not a model folder (no config.json): pass a folder written by "
                             f"save_pretrained or compress, a hub id or a .gguf file")
        for file in sorted(path.glob("*.safetensors")):
            read_header(file)
    elif spec.endswith(".gguf"):
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelError(f"{spec!r} is not a GGUF file (it does not start with GGUF): pass a .gguf model")


def _check_shapes(folder: Path) -> None:
    """Refuse a local safetensors folder whose tensors lack the shapes its config.json gives them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.checkpoint import Checkpoint, check_shapes

    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None):
        return  # stored in a quantized layout: transformers' loader checks it
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    check_shapes(Checkpoint(folder), skeleton)


def open_streamed(spec: str, dtype: str = "auto"):
    """Open a local safetensors folder for block-by-block work: the model's module tree on the meta device
    with only the weights outside its decoder blocks loaded; each block is read when needed
    (``checkpoint.materialize``) and dropped after (``checkpoint.release``), so memory holds one block.

    Returns:
        ``(model, tokenizer, checkpoint)``, or ``None`` when ``spec`` is not such a folder or its tensor
        names are not the model's own (older layouts transformers renames on load): use ``load`` then.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.checkpoint import Checkpoint, check_shapes, materialize, streamable
    from compress.experts import name_per_expert, unfuse_experts

    path = Path(spec)
    if spec.endswith(".gguf") or not path.is_dir() or not any(path.glob("*.safetensors")):
        return None
    check_local(spec)
    check_dtype(dtype)
    try:
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "quantization_config", None):
            return None  # a quantized checkpoint: transformers' loader knows how to read it
        torch_dtype = DTYPES[dtype] if dtype != "auto" else _config_dtype(config)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ModelError(f"{spec!r} is not a causal LM: compress needs a model AutoModelForCausalLM loads") from err
        raise ModelError(f"cannot load {spec!r}: {str(err).splitlines()[0]}") from err
    model.tie_weights()
    checkpoint = Checkpoint(path)
    if unfuse_experts(model) and not streamable(checkpoint, model):
        name_per_expert(model)  # the hub's layout (what save_pretrained writes): read and written as such
    check_shapes(checkpoint, model)
    if not streamable(checkpoint, model):
        log.info("%s: tensor names differ from the model's; loading it whole", spec)
        return None
    prefix, _ = decoder_blocks(model)
    outside = [n for n in model.state_dict() if not n.startswith(prefix + ".") and n in checkpoint.names()]
    materialize(model, checkpoint.read(outside), strict=False)
    model.tie_weights()
    model.eval()
    model.config.use_cache = False
    return model, tokenizer_of(path, spec), checkpoint


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return DTYPES.get(dtype, torch.float32) if isinstance(dtype, str) else dtype


def load_packed(folder: Path, packed: dict[str, dict], dtype: torch.dtype | None = None) -> nn.Module:
    """The causal LM of a ``--format packed`` folder: the module tree built on the meta device, each packed
    linear (``packed``: compression.json's table) replaced by a ``PackedLinear``, every other tensor read
    from the shards. The model never exists with dense copies of the packed weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.checkpoint import Checkpoint, materialize
    from compress.experts import unfuse_experts
    from compress.kernels.formats import PARTS, Q4Sparse24
    from compress.kernels.fused import fuse_siblings
    from compress.kernels.linear import LAYOUTS, PackedEmbedding, PackedLinear

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    dtype = dtype or _config_dtype(config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    unfuse_experts(model)  # a mixture-of-experts model's experts are packed one by one, as linears
    checkpoint = Checkpoint(folder)
    names = checkpoint.names()
    used = set()
    for name, info in packed.items():
        layout = LAYOUTS[info["layout"]]
        keys = {p: f"{name}.packed_{p}" for p in PARTS}
        tensors = checkpoint.read([k for k in keys.values() if k in names])
        parts = {p: tensors.get(k) for p, k in keys.items() if p != "pos" or layout is Q4Sparse24}
        bias = checkpoint.read([f"{name}.bias"])[f"{name}.bias"] if f"{name}.bias" in names else None
        parent_name, _, leaf = name.rpartition(".")
        weight = layout(**parts, shape=tuple(info["shape"]), group_size=info["group_size"])
        linear = PackedLinear(weight, bias)
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, linear)
        if info.get("tied_embedding"):  # a tied input embedding reads the same packed weights
            parent_name, _, leaf = info["tied_embedding"].rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf,
                    PackedEmbedding(linear, dtype))
        used.update(tensors, {f"{name}.bias"})
    materialize(model, checkpoint.read(sorted(names - used)), strict=False)
    if isinstance(model.get_output_embeddings(), PackedLinear):
        # the packed weights carry the tie (PackedEmbedding reads lm_head's); transformers' tie_weights,
        # which lm-eval calls, must not look for a dense embedding weight to tie
        model.config.get_text_config().tie_word_embeddings = False
        model.config.tie_word_embeddings = False
    else:
        model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if missing:
        raise ValueError(f"{str(folder)!r} does not hold {missing[0]} (and {len(missing) - 1} more): not a complete packed folder")
    fuse_siblings(model)  # q|k|v and gate|up: one kernel call each
    model.eval()
    model.config.use_cache = True
    return model


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(prefix, blocks)``: the ModuleList of the model's ``num_hidden_layers`` decoder blocks.

    Raises:
        ModelError: no such list (an architecture this module cannot see through).
    """
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers:
            return name, module
    raise ModelError(
        f"{type(model).__name__}: found no ModuleList of config.num_hidden_layers={n_layers} decoder blocks; "
        "this architecture is not supported yet"
    )


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linears(block: nn.Module) -> dict[str, nn.Module]:
    """The block's prunable linear layers by name relative to the block, in definition order; a
    mixture-of-experts router (``experts.routers``: Qwen2-MoE's shared-expert gate is an nn.Linear) stays."""
    from compress.experts import routers

    kept = set(routers(block))
    return {name: m for name, m in block.named_modules() if name and is_linear(m) and name not in kept}


def gated_up_projection(block: nn.Module, name: str) -> str | None:
    """For the down projection of a gated MLP (``down(act(gate(x)) * up(x))``: Llama, Qwen2, Mistral...),
    the name of its ``up`` projection within ``block``; ``None`` for any other linear."""
    parent_path, _, leaf = name.rpartition(".")
    parent = block.get_submodule(parent_path) if parent_path else block
    if leaf == "down_proj" and all(is_linear(getattr(parent, a, None)) for a in ("gate_proj", "up_proj")):
        return f"{parent_path}.up_proj" if parent_path else "up_proj"
    return None


def weight_view(linear: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)``; a view, so ``weight_view(m).copy_(W)`` writes the module's weight."""
    w = linear.weight.data
    return w.t() if type(linear).__name__ == "Conv1D" else w


def in_features(linear: nn.Module) -> int:
    return weight_view(linear).shape[1]


def is_ignored(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, name) for p in patterns)


def move_non_blocks_(model: nn.Module, blocks_prefix: str, device: torch.device) -> None:
    """Move every parameter and buffer outside the decoder blocks (embeddings, norms, rotary) to ``device``."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not name.startswith(blocks_prefix + "."):
            tensor.data = tensor.data.to(device)


@dataclass
class Coverage:
    """How much of the decoder blocks' weights (tensors of 2 or more dimensions) sit in linears the recipe
    compresses, and which other weights there are (fused 3-D expert tensors, for instance), by name within a
    block, with their shares."""

    compressed: float
    other: dict[str, float]

    def check(self, allow_partial: bool) -> None:
        """Warn about weights no recipe reaches; refuse when they are most of the blocks' weights.

        Raises:
            ModelError: over half of the blocks' weights are not linears, and not ``allow_partial``.
        """
        if not self.other:
            return
        share = sum(self.other.values())
        listed = ", ".join(f"{name} ({s:.0%})" for name, s in sorted(self.other.items(), key=lambda kv: -kv[1]))
        if share > 0.5 and not allow_partial:
            raise ModelError(f"{share:.0%} of the decoder blocks' weights are not linear layers compress can "
                             f"compress yet: {listed}; pass --allow-partial to compress the rest "
                             f"({self.compressed:.0%}) alone")
        log.warning("%.0f%% of the decoder blocks' weights are not linear layers and stay as they are: %s",
                    100 * share, listed)

    def to_dict(self) -> dict:
        return {"compressed_share": self.compressed, "other_share": sum(self.other.values()), "other": self.other}


def coverage(model: nn.Module, ignore: tuple[str, ...] = ()) -> Coverage:
    """What a recipe with ``ignore`` reaches of ``model``'s decoder blocks (weights on the meta device count
    by their shapes)."""
    prefix, blocks = decoder_blocks(model)
    total, compressed, other = 0, 0, {}
    for i, block in enumerate(blocks):
        linear_names = set(linears(block))
        for name, param in block.named_parameters():
            if param.dim() < 2:
                continue
            total += param.numel()
            owner = name.rpartition(".")[0]
            if owner in linear_names:
                compressed += 0 if is_ignored(f"{prefix}.{i}.{owner}", ignore) else param.numel()
            else:
                other[name] = other.get(name, 0) + param.numel()
    total = total or 1
    return Coverage(compressed / total, {name: n / total for name, n in other.items()})
