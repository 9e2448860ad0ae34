"""The vocabulary a GGUF file carries (``tokenizer.ggml.*``), as llama.cpp's loader reads it.

Two sources, both exact:
- a ``.gguf`` source model: its own ``tokenizer.*`` entries, copied as they are;
- a transformers tokenizer (``tokenizer.json``): byte-level BPE (the GPT-2 family: GPT-2, SmolLM, Llama 3,
  Qwen2/3 tokenizers) written as llama.cpp's ``gpt2`` model: tokens in id order, merges, token types and the
  pre-tokenizer's name. llama.cpp splits text with its own regexes, chosen by that name, so a pre-tokenizer it
  has no name for would tokenize differently: it is refused (``VocabError``) before any work, as are
  tokenizers of other kinds (SentencePiece / Unigram / WordPiece).
"""

from __future__ import annotations

import json
from pathlib import Path

from compress.outputs import OutputError

# llama.cpp's token types (llama.h: LLAMA_TOKEN_TYPE_*)
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4

# The split regexes of tokenizer.json's ``Split`` pre-tokenizers llama.cpp knows, by its name for them.
_SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


class VocabError(OutputError):
    """The tokenizer cannot be written so that llama.cpp tokenizes as transformers does."""


def _byte_level(step: dict, use_regex: bool) -> bool:
    return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space", False)
            and step.get("use_regex", True) == use_regex)


def pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name (``tokenizer.ggml.pre``) for tokenizer.json's ``pre_tokenizer``, or None."""
    if pre is None:
        return None
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and _byte_level(steps[0], use_regex=True):
        return "gpt-2"
    if len(steps) != 2:
        return None
    first, second = steps
    if first.get("type") == "Digits" and first.get("individual_digits") and _byte_level(second, use_regex=True):
        return "smollm"
    if first.get("type") == "Split" and _byte_level(second, use_regex=False):
        return _SPLIT_PATTERNS.get((first.get("pattern") or {}).get("Regex"))
    return None


def from_gguf(path: str | Path) -> list[tuple]:
    """The ``tokenizer.*`` entries of a GGUF file as ``(key, value, type, sub_type)``."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    found = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
            found.append((key, field.contents(), vtype, sub))
    if not found:
        raise VocabError(f"{path} holds no tokenizer (tokenizer.ggml.*): pass a model with its vocabulary")
    return found


def from_tokenizer(tokenizer, n_vocab: int) -> list[tuple]:
    """The ``tokenizer.*`` entries of a transformers fast tokenizer (byte-level BPE), for a model whose
    embedding has ``n_vocab`` rows (llama.cpp needs one token per row: ids no token has are padding).

    Raises:
        VocabError: naming what llama.cpp could not reproduce, and the fix.
    """
    from gguf import GGUFValueType as T

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise VocabError(f"--format gguf needs a fast tokenizer (tokenizer.json); {type(tokenizer).__name__} has "
                         f"none: use --format dense and llama.cpp's converter")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise VocabError(f"--format gguf writes byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM); this one is "
                         f"{model.get('type')}{' with byte fallback (SentencePiece-style)' if model.get('byte_fallback') else ''}: "
                         f"use --format dense and llama.cpp's converter")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise VocabError(f"--format gguf: llama.cpp has no pre-tokenizer matching this tokenizer's "
                         f"({json.dumps(spec.get('pre_tokenizer'))[:120]}), so it would split text differently: use "
                         f"--format dense and llama.cpp's converter")
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    if max(vocab.values()) >= n_vocab:
        raise VocabError(f"--format gguf: the tokenizer has ids up to {max(vocab.values())} but the model's embedding "
                         f"has {n_vocab} rows, so llama.cpp would refuse the file: use --format dense")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]  # ids no token has (llama.cpp's converter names them so too)
    types = [USER_DEFINED] * n_vocab
    for token, i in vocab.items():
        tokens[i], types[i] = token, NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = CONTROL if added.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    found = [("tokenizer.ggml.model", "gpt2", T.STRING, None), ("tokenizer.ggml.pre", pre, T.STRING, None),
             ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING), ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
             ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING)]
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            key = {"unk": "unknown", "pad": "padding"}.get(role, role)
            found.append((f"tokenizer.ggml.{key}_token_id", int(token_id), T.UINT32, None))
    ids = tokenizer("a")["input_ids"]
    found.append(("tokenizer.ggml.add_bos_token", bool(ids) and ids[0] == tokenizer.bos_token_id, T.BOOL, None))
    found.append(("tokenizer.ggml.add_eos_token", bool(ids) and ids[-1] == tokenizer.eos_token_id, T.BOOL, None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        found.append(("tokenizer.chat_template", template, T.STRING, None))
    return found


def vocabulary(tokenizer, source: str, n_vocab: int) -> list[tuple]:
    """The vocabulary entries for a model read from ``source`` with ``n_vocab`` embedding rows (copied from a
    ``.gguf`` source, else derived from ``tokenizer``)."""
    if str(source).endswith(".gguf"):
        return from_gguf(source)
    return from_tokenizer(tokenizer, n_vocab)
