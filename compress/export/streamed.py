"""The prune run's output written as the driver goes: one shard per decoder block, then the rest."""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from compress.export import compressed_tensors, gguf, packed
from compress.kernels import allocator
from compress.outputs import GGUF_FILE, METADATA, RESUME_STATE, finish_state, versions


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
        fmt: ``dense``, ``compressed-tensors``, ``packed`` (compress's kernels' layouts, listed under
            ``packed`` in compression.json; ``compress.load`` reads it) or ``gguf`` (the shards hold llama.cpp's
            tensors; ``finish`` assembles them into one file, ``gguf.GGUF_FILE``, and removes them).
        fingerprint: what a resumed run must match (model files, calibration, recipe, versions).
        save_every: seconds between saves of the resume state (the next block's inputs and the report so far,
            after a block's shard is written); ``None`` never saves one, 0 saves after every block.
        source: the model as given (``gguf``: a ``.gguf`` source's vocabulary is copied from it).
        gguf_dtype: ``gguf``: the type of the 2-D tensors the recipe does not quantize.
    """

    def __init__(self, model, folder: Path, checkpoint=None, fmt: str = "dense", recipe=None,
                 fingerprint: dict | None = None, save_every: float | None = None, source: str = "",
                 gguf_dtype: str = "f16"):
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
        self.keeps_codes = fmt != "dense"
        self.recipe = recipe
        self.dtype = next(iter(model.parameters())).dtype
        self.quantized_names: set[str] = set()
        self.packed_layers: dict[str, dict] = {}  # --format packed: linear name -> layout, shape, group size
        self.source, self.gguf_dtype = source, gguf_dtype
        self.gguf_names = gguf.TensorNames(model.config) if fmt == "gguf" else None

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

        from compress.reports import BlockState

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
        from compress.experts import per_expert_names

        with per_expert_names(block) if self.fmt != "dense" else nullcontext():  # experts one by one
            state = {f"{self.prefix}.{index}.{n}": t for n, t in block.state_dict().items()}
        act = self.recipe.act if self.recipe is not None else None
        if self.fmt == "gguf":
            state = gguf.block_state(state, quantized, self.gguf_names)
        elif self.fmt == "compressed-tensors":
            for name in list(quantized):  # one linear at a time: its codes go as its stored form comes
                state = compressed_tensors.pack_state(state, {name: quantized.pop(name)}, self.dtype)
                self.quantized_names.add(name)
        elif self.fmt == "packed":
            for name in list(quantized):
                input_major = {name} if act and act.target_for(name) else set()
                state, layers = packed.pack_state(state, {name: quantized.pop(name)}, input_major)
                self.packed_layers.update(layers)
        quantized.clear()
        self.writer.write(index, state)
        release(block)
        allocator.trim()  # what packing left in the reuse cache: the next block's load needs the room
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
        if self.fmt == "gguf":
            return self._finish_gguf(model, tokenizer, gguf.head_state(model, state, self.recipe, self.gguf_names), metadata)
        if self.recipe is not None and self.recipe.quant_lm_head:
            self.packed_layers.update(packed.quantize_lm_head(model, state, self.recipe, self.fmt) or {})
        self.writer.write(self.writer.n_shards - 1, state)
        self.writer.finish()
        model.config.save_pretrained(self.folder)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(self.folder)
        if self.fmt == "compressed-tensors":
            path = self.folder / "config.json"
            config = json.loads(path.read_text())
            config["quantization_config"] = compressed_tensors.quantization_config(model, self.quantized_names, self.recipe)
            path.write_text(json.dumps(config, indent=2) + "\n")
        if self.fmt == "packed":
            metadata = {**metadata, "packed": self.packed_layers}
        _write_extras(self.folder, tokenizer, metadata, act_thresholds, gate_space, act_edges)
        if self.save_every is not None:  # complete: a kill from here on never recomputes it
            finish_state(self.folder, self.fingerprint)

    def _finish_gguf(self, model, tokenizer, state: dict, metadata: dict) -> None:
        """Assemble the shards into ``gguf.GGUF_FILE``, then drop them (after the resume state says finished,
        so that a kill in between never leaves a run whose shards are gone)."""
        from compress.export.gguf_vocab import vocabulary

        self.writer.write(self.writer.n_shards - 1, state)
        shards = [self.folder / self.writer.shard_name(k) for k in range(self.writer.n_shards)]
        qtype = gguf.quant_type(self.recipe.quant if self.recipe is not None else None)
        metadata = {**metadata, "gguf_dtype": self.gguf_dtype, "versions": versions()}
        vocab = vocabulary(tokenizer, self.source, model.get_input_embeddings().weight.shape[0])
        gguf.assemble(shards, self.folder / GGUF_FILE, model.config, vocab, metadata, qtype, self.gguf_dtype)
        if self.save_every is not None:
            finish_state(self.folder, self.fingerprint)
        for shard in shards:
            shard.unlink()
