"""How far bf16 products move the calibration Gram matrix, against how far the calibration sample moves it.

On SmolLM2-135M with issue 2's calibration (128 x 512 tokens of valid.txt, seed 0), for the inputs of four
linears in three blocks of the dense model: ``‖G_bf16 − G‖ / ‖G‖`` (``--gram-precision bf16`` against fp32
products, Frobenius norm) and ``‖G_half1 − G_half2‖ / ‖G‖`` (the same fp32 Gram matrix over the first and the
last 64 samples: the sampling error any calibration set carries). Prints a table and writes JSON.

    python benchmarks/gram_precision.py --work bench-work
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import prepare, protocol_parser  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def main() -> None:
    from compress import models
    from compress.calibration.stats import Gram, resolve_precision

    ap = protocol_parser(__doc__, peer=False)
    ap.add_argument("--blocks", type=int, nargs="*", default=[0, 14, 29])
    ap.add_argument("--json", type=Path, help="write the results here (default: WORK/gram-precision.json)")
    args = ap.parse_args()
    if resolve_precision("auto", "cpu") != "bf16":
        sys.exit("this CPU has no AMX: --gram-precision auto is fp32 here, nothing to compare")
    _, dense_dir, calib = prepare(args.work, args.data, args.nsamples, args.calib_seqlen)
    tokens = torch.load(calib)
    half = tokens.shape[0] // 2
    model, _ = models.load(str(dense_dir))
    prefix, blocks = models.decoder_blocks(model)
    grams: dict[str, dict[str, Gram]] = {}
    sample = {"first": 0}

    def hook(name: str):
        def add(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            g = grams.setdefault(name, {"fp32": Gram(x.shape[1]), "bf16": Gram(x.shape[1], products="bf16"),
                                        "half1": Gram(x.shape[1]), "half2": Gram(x.shape[1])})
            for key in ("fp32", "bf16", "half1" if sample["first"] < half else "half2"):
                g[key].update(x)
        return add

    for b in args.blocks:
        for lin in LINEARS:
            blocks[b].get_submodule(lin).register_forward_pre_hook(hook(f"{prefix}.{b}.{lin}"))
    with torch.no_grad():
        for start in range(0, tokens.shape[0], 8):
            sample["first"] = start
            model(input_ids=tokens[start : start + 8], use_cache=False)
    results = {}
    print("| linear input | bf16 products | two halves of the calibration |\n|---|---|---|")
    for name, g in grams.items():
        G = g["fp32"].finalize()
        norm = torch.linalg.norm(G)
        results[name] = {"bf16_products": float(torch.linalg.norm(g["bf16"].finalize() - G) / norm),
                         "halves": float(torch.linalg.norm(g["half1"].finalize() - g["half2"].finalize()) / norm)}
        print(f"| {name} | {results[name]['bf16_products']:.1e} | {results[name]['halves']:.1e} |")
    out = args.json or args.work / "gram-precision.json"
    out.write_text(json.dumps({"calibration": f"{tokens.shape[0]} x {tokens.shape[1]}", "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
