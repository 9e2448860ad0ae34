"""Behaviour pinned across a refactor: eight CLI recipes on one tiny model, every output tensor hashed.

Builds (once, in ``--work``) a tiny random Llama with a byte-level BPE tokenizer trained on WikiText-2 valid,
runs each recipe below through ``python -m compress.cli prune`` (the package of the current directory, so a git
worktree of another commit can be measured on the same model), and prints one SHA-256 per recipe over every
tensor of its output (names, dtypes, shapes and bytes; activation thresholds included). Equal digests at two
commits mean the two wrote the same model.

    python benchmarks/recipe_hashes.py --work bench-hashes --json hashes.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import DEFAULT_DATA  # noqa: E402

RECIPES = {
    "wanda 2:4": ["--method", "wanda", "--pattern", "2:4"],
    "sparsegpt 50% + gptq w4g32": ["--method", "sparsegpt", "--sparsity", "0.5", "--quant", "w4g32"],
    "rtn w4g32": ["--quant", "w4g32", "--quant-method", "rtn"],
    "wanda 60% owl": ["--method", "wanda", "--sparsity", "0.6", "--allocation", "owl"],
    "wanda 60% dsnot": ["--method", "wanda", "--sparsity", "0.6", "--refine", "dsnot"],
    "teal 40%": ["--act-sparsity", "0.4", "--act-method", "teal"],
    "packed sparsegpt 2:4 + w4g32": ["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g32", "--format", "packed"],
    "compressed-tensors wanda 50% + w4g32": ["--method", "wanda", "--sparsity", "0.5", "--quant", "w4g32",
                                             "--format", "compressed-tensors"],
}


def build(folder: Path, data: Path) -> Path:
    """A tiny random Llama (4 blocks, hidden 64) and a 512-token BPE tokenizer, saved once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([(data / "valid.txt").read_text()[:300_000]],
                            trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def digest(folder: Path) -> tuple[str, int]:
    """SHA-256 over every tensor of every safetensors file in ``folder`` (by name), and the tensor count."""
    import torch
    from safetensors import safe_open

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():
                t = fh.get_tensor(name).contiguous()
                raw = t.view(-1).view(torch.uint8).numpy().tobytes()
                tensors[name] = (str(t.dtype), list(t.shape), hashlib.sha256(raw).hexdigest())
    return hashlib.sha256(json.dumps(sorted(tensors.items())).encode()).hexdigest(), len(tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench-hashes"))
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model = build(args.work / "tiny-llama", args.data)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = {}
    for name, flags in RECIPES.items():
        out = args.work / f"{commit or 'out'}-{name.replace(' ', '_').replace(':', '-').replace('%', '')}"
        command = [sys.executable, "-m", "compress.cli", "prune", str(model), *flags, "--calib",
                   str(args.data / "valid.txt"), "--nsamples", "8", "--seqlen", "64", "--device", "cpu",
                   "--out", str(out), "--overwrite"]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"{name}: exit {run.returncode}\n{run.stderr[-2000:]}")
        results[name] = dict(zip(("sha256", "tensors"), digest(out)))
        print(f"{name:<40} {results[name]['sha256'][:16]}  ({results[name]['tensors']} tensors)", flush=True)
    (args.json or args.work / f"hashes-{commit}.json").write_text(json.dumps({"commit": commit, "recipes": results},
                                                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
