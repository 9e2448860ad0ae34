"""Tiny random models of several families, built in-process and seeded; a tiny tokenizer trained here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2"
VOCAB = 320


def _text_sample() -> str:
    valid = WIKITEXT / "valid.txt"
    if valid.is_file():
        return valid.read_text(encoding="utf-8")[:200_000]
    # without the shared data (a clone elsewhere): 400 random "words", enough for the tokenizer to reach VOCAB ids
    gen = torch.Generator().manual_seed(0)
    letters = torch.randint(0, 26, (400, 6), generator=gen).tolist()
    words = ["".join(chr(97 + c) for c in row[: 2 + i % 5]) for i, row in enumerate(letters)]
    return " ".join(words[i] for i in torch.randint(0, len(words), (40_000,), generator=gen).tolist())


def build(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random causal LM of ``family`` (llama, llama-tied, mistral, qwen2, qwen3, opt, gpt2), eval mode,
    float32."""
    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, **overrides}
    if family in ("llama", "llama-tied"):
        cfg = LlamaConfig(**{**dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=128, max_position_embeddings=256,
                                    tie_word_embeddings=family == "llama-tied"), **common})
        model = LlamaForCausalLM(cfg)
    elif family in ("mistral", "qwen2", "qwen3"):
        config, causal_lm = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family]
        cfg = config(**{**dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=128, max_position_embeddings=256, head_dim=16), **common})
        model = causal_lm(cfg)
    elif family == "opt":
        cfg = OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                        max_position_embeddings=256, word_embed_proj_dim=64, **common)
        model = OPTForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(family)
    return model.eval()


FAMILIES = ["llama", "llama-tied", "qwen2", "opt", "gpt2"]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_text_sample()], trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def calib_txt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(_text_sample(), encoding="utf-8")
    return path


@pytest.fixture
def saved_model(tmp_path, tokenizer):
    """Factory: save a tiny model of ``family`` with the tokenizer; returns its folder."""

    def make(family: str = "llama") -> Path:
        folder = tmp_path / f"{family}-dense"
        build(family).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    return make


def outlier_inputs(n_tokens: int, n_in: int, n_outliers: int = 4, scale: float = 20.0, seed: int = 0) -> torch.Tensor:
    """Correlated activations with a few large-magnitude channels, as LLM activations have (Dettmers et al.)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=gen) / n_in**0.5 + torch.eye(n_in)
    X = torch.randn(n_tokens, n_in, generator=gen) @ mix  # (tokens, in)
    X[:, torch.randperm(n_in, generator=gen)[:n_outliers]] *= scale
    return X


@pytest.fixture(params=[0, 1, 2], ids=["portable", "avx2", "avx512"])
def isa(request):
    """The compiled kernels with their ISA level forced to each one this CPU has (the others skip)."""
    from compress.kernels.build import ops

    kernels = ops()
    if kernels is None:
        pytest.skip("no compiled kernels here (no C++ compiler)")
    best = int(kernels.isa())
    if request.param > best:
        pytest.skip(f"this CPU has ISA level {best}")
    kernels.set_isa(request.param)
    yield kernels
    kernels.set_isa(best)
