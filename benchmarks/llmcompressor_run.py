"""Run llm-compressor's ``oneshot`` as the peer to compare with. Runs in its own venv.

Feeds it the exact calibration token windows ``compress`` samples (a tensor file written by
``benchmarks/quality.py``), saves the result as plain dense safetensors (quantized weights dequantized, as
its fake-quantized forward computes with them), and writes wall time and peak RSS to ``timing.json``.

    python benchmarks/llmcompressor_run.py MODEL_DIR CALIB.pt wanda|sparsegpt 0.5|2:4 OUT_DIR
    python benchmarks/llmcompressor_run.py MODEL_DIR CALIB.pt gptq w4g64 OUT_DIR
    python benchmarks/llmcompressor_run.py MODEL_DIR CALIB.pt sparsegpt+gptq 2:4,w4g64 OUT_DIR
"""

import json
import resource
import sys
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

IGNORE = ["re:.*lm_head"]


def gptq_modifier(spec: str):
    """GPTQModifier for ``wBgG`` (symmetric int, static groups, its default act-order)."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    bits, group = spec[1:].split("g")
    weights = {"num_bits": int(bits), "type": "int", "symmetric": True, "strategy": "group", "group_size": int(group)}
    return GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=IGNORE)


def prune_modifier(method: str, pattern: str):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    nm = ":" in pattern
    # lm_head is tied to the embeddings here: the modifier's default targets prune both, which
    # compress keeps dense (Wanda 50%: 54.4 instead of 40-41). A plain "lm_head" does not match the name
    # llm-compressor builds ("lm_head." with a trailing dot); its docs ask for "re:.*lm_head".
    kwargs = dict(sparsity=0.5 if nm else float(pattern), mask_structure=pattern if nm else "0:0", ignore=IGNORE)
    return {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method](**kwargs)


def dense_state(model) -> dict:
    """The model's weights without quantization parameters: what its fake-quantized forward multiplies by."""
    skip = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale")
    return {k: v for k, v in model.state_dict().items() if not k.endswith(skip)}


def main(model_dir: str, calib_path: str, method: str, pattern: str, out: str) -> None:
    from llmcompressor import oneshot

    start = time.perf_counter()
    tokens = torch.load(calib_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    if method == "gptq":
        recipe = [gptq_modifier(pattern)]
    elif method == "sparsegpt+gptq":
        sparse, quant = pattern.split(",")
        recipe = [prune_modifier("sparsegpt", sparse), gptq_modifier(quant)]
    else:
        recipe = [prune_modifier(method, pattern)]
    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=data,
        recipe=recipe,
        num_calibration_samples=tokens.shape[0],
        max_seq_length=tokens.shape[1],
        shuffle_calibration_samples=False,
    )
    oneshot_s = time.perf_counter() - t0
    if "gptq" in method:
        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(dense_state(model), strict=False)
        if unexpected or any("lm_head" not in k for k in missing):
            raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
        plain.save_pretrained(out)
    else:
        model.save_pretrained(out, save_compressed=False)
    tokenizer.save_pretrained(out)
    timing = {
        "method": method,
        "pattern": pattern,
        "oneshot_seconds": oneshot_s,
        "process_seconds": time.perf_counter() - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    with open(f"{out}/timing.json", "w") as fh:
        json.dump(timing, fh, indent=2)
    print(json.dumps(timing))


if __name__ == "__main__":
    main(*sys.argv[1:])
