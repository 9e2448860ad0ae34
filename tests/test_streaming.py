"""Block-by-block reading and writing: the streamed run gives the in-memory run's weights, holding one block."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from compress import experts, export, models
from compress.checkpoint import INDEX_FILE, Checkpoint
from compress.config import Pattern, PruneConfig, QuantConfig, Recipe
from compress.export import compressed_tensors, packed
from compress.pipeline import compress_sequential
from tests.conftest import VOCAB


def _tokens(n=6, seqlen=24, seed=0):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_checkpoint_reads_every_dtype_of_sharded_files_as_safetensors_does(tmp_path):
    gen = torch.Generator().manual_seed(0)
    shards = {
        "a.safetensors": {"f32": torch.randn(3, 5, generator=gen), "bf16": torch.randn(7, generator=gen).bfloat16(),
                          "empty": torch.zeros(0, 4)},
        "b.safetensors": {"f16": torch.randn(2, 2, 2, generator=gen).half(), "i64": torch.arange(9).view(3, 3),
                          "bool": torch.rand(5, generator=gen) > 0.5, "i8": torch.randint(-8, 8, (11,), dtype=torch.int8)},
    }
    for file, tensors in shards.items():
        save_file(tensors, str(tmp_path / file), metadata={"format": "pt"})
    save_file({"stray": torch.ones(1)}, str(tmp_path / "not-indexed.safetensors"))
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {n: f for f, ts in shards.items() for n in ts}}))

    checkpoint = Checkpoint(tmp_path)
    assert checkpoint.names() == {n for ts in shards.values() for n in ts}  # the index decides, not the glob
    got = checkpoint.read(checkpoint.names())
    for file in shards:
        for name, expected in load_file(str(tmp_path / file)).items():
            assert got[name].dtype == expected.dtype and torch.equal(got[name], expected), name
    assert checkpoint.read(["bf16"], dtype=torch.float32)["bf16"].dtype == torch.float32
    assert checkpoint.read(["i64"], dtype=torch.float32)["i64"].dtype == torch.int64  # only floats are cast


class _Watch(export.StreamedOutput):
    """Notes, whenever a block is loaded, how many blocks hold real (non-meta) weights, and when a block is
    done, how many of its quantized linears still hold a dense weight."""

    resident: list[int]
    dense_at_done: list[int]

    def load(self, index, block):
        super().load(index, block)
        blocks = models.decoder_blocks(self.model)[1]
        self.resident.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in blocks))

    def done(self, index, block, quantized, block_state=None):
        self.dense_at_done.append(sum(not self.model.get_submodule(n).weight.is_meta for n in quantized))
        super().done(index, block, quantized, block_state)


@pytest.mark.parametrize("family", ["llama-tied", "opt", "gpt2", "qwen3_moe"])
@pytest.mark.parametrize("recipe", [Recipe(PruneConfig("sparsegpt", Pattern.parse(pattern="2:4"))),
                                    Recipe(PruneConfig("wanda", Pattern(0.5)), quant=QuantConfig(bits=4, group_size=16))],
                         ids=["sparsegpt24", "wanda+gptq"])
@pytest.mark.parametrize("fmt", ["dense", "compressed-tensors", "packed"])
def test_streamed_run_writes_the_in_memory_result_one_block_in_memory(family, recipe, fmt, saved_model, tokenizer,
                                                                      tmp_path):
    if fmt != "dense" and (recipe.quant is None or family == "gpt2"):
        pytest.skip("compressed-tensors and packed hold quantized nn.Linear layers")
    if family == "qwen3_moe":
        from tests.test_moe import _save

        source = tmp_path / "moe"
        _save(family, source, tokenizer)  # 2 blocks, 8 experts each, per expert in the checkpoint
    else:
        source = saved_model(family)  # 2 blocks
    tokens = _tokens()

    in_memory, _ = models.load(str(source))
    experts.unfuse_experts(in_memory)  # as compress.prune does (open_streamed does it too)
    in_memory_report = compress_sequential(in_memory, tokens, recipe)

    streamed, tokenizer, checkpoint = models.open_streamed(str(source))
    assert all(p.device.type == "meta" for p in models.decoder_blocks(streamed)[1].parameters())
    out = tmp_path / "out"
    out.mkdir()
    io = _Watch(streamed, out, checkpoint, fmt, recipe)
    io.model, io.resident, io.dense_at_done = streamed, [], []
    report = compress_sequential(streamed, tokens, recipe, io=io)
    io.finish(streamed, tokenizer, {"report": report.to_dict()})

    assert io.resident == [1, 1]
    assert io.dense_at_done == [0, 0]  # written from their codes: the dense weights were dropped as compressed
    assert len(list(out.glob("model-*-of-00003.safetensors"))) == 3
    with experts.per_expert_names(in_memory):  # as the checkpoint stores them (a no-op without experts)
        expected = in_memory.state_dict()
    if fmt == "compressed-tensors":
        expected = compressed_tensors.pack_state(expected, in_memory_report.quantized, torch.float32)
    if fmt == "packed":
        expected = packed.pack_state(expected, in_memory_report.quantized)[0]
    stored = Checkpoint(out)
    tied = {"lm_head.weight"} if in_memory.config.tie_word_embeddings else set()
    assert stored.names() == set(expected) - tied
    for name, tensor in stored.read(stored.names()).items():
        assert torch.equal(tensor, expected[name]), name
    if fmt == "dense":
        reloaded = AutoModelForCausalLM.from_pretrained(out)
        fused = in_memory.state_dict()  # transformers' names (fused experts)
        for name, tensor in reloaded.state_dict().items():
            assert torch.equal(tensor, fused[name]), name
        if tied:
            assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()


def test_folder_with_foreign_tensor_names_is_loaded_whole(saved_model):
    source = saved_model("llama")
    tensors = load_file(str(source / "model.safetensors"))
    save_file({f"legacy.{n}": t for n, t in tensors.items()}, str(source / "model.safetensors"), metadata={"format": "pt"})
    assert models.open_streamed(str(source)) is None
