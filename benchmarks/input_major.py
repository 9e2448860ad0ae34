"""Does the input-major W4 layout read less when inputs are zero? (issue 25, TEAL point)

A decode step reads each weight matrix once, from DRAM: here each contender runs over ``--copies`` copies of
the same matrix in turn (more bytes than the L3 holds), so no call finds its weights in cache, as in a model's
step. Per shape (TinyLlama-1.1B's gate/up and down, group 32, fp16 scales, batch 1, 2 threads): the row-major
W4 product on int8 inputs (``q4_dense_i8_mm``) with dense inputs, and the input-major W4 on int8 inputs
(``q4_input_major_i8_mm``) and on fp32 inputs (``q4_input_major_mm``) with 0% and 40% of the inputs zero (TEAL's
sparsity, at random). Medians over ``--rounds`` interleaved rounds, milliseconds per product.

    python benchmarks/input_major.py --json benchmarks/results/input-major.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from compress.kernels.build import ops
from compress.kernels.formats import Q4Dense, Q4InputMajor

SHAPES = [(5632, 2048), (2048, 5632)]


def contenders(out: int, n_in: int, copies: int, gen: torch.Generator) -> dict:
    """name -> callable running the product once on each of ``copies`` copies of its weights."""
    k = ops()
    codes = torch.randint(-8, 8, (out, n_in), dtype=torch.int8, generator=gen)
    scale = torch.rand(out, n_in // 32, generator=gen) / 8
    dense, major = Q4Dense.pack(codes, scale, None, 32), Q4InputMajor.pack(codes, scale, None, 32)
    dense_copies = [(dense.data.clone(), dense.scale.clone()) for _ in range(copies)]
    major_copies = [(major.data.clone(), major.scale.clone()) for _ in range(copies)]
    major_fp32 = [(d, s.float()) for d, s in major_copies]  # what the fp32-input kernel reads
    x = torch.randn(1, n_in, generator=gen)
    x40 = x * (torch.rand(1, n_in, generator=gen) >= 0.4)

    def each(fn, weights, xs):
        return lambda: [fn(xs, d, s, None, out, 32) for d, s in weights]

    return {
        "row-major W4 int8 x": each(k.q4_dense_i8_mm, dense_copies, x),
        "input-major W4 int8 x, 0% zero": each(k.q4_input_major_i8_mm, major_copies, x),
        "input-major W4 int8 x, 40% zero": each(k.q4_input_major_i8_mm, major_copies, x40),
        "input-major W4 fp32 x, 40% zero": each(k.q4_input_major_mm, major_fp32, x40),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if ops() is None:
        raise SystemExit("compress's kernels could not be built here (see the warning above)")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    results = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "copies": args.copies,
               "int8_isa": ["portable", "avx2", "avx512-vnni"][int(ops().int8_isa())], "shapes": {}}
    for out, n_in in SHAPES:
        runs = contenders(out, n_in, args.copies, gen)
        times = {name: [] for name in runs}
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(args.rounds):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) / args.copies * 1e3)
        ms = {name: statistics.median(t) for name, t in times.items()}
        base = ms["row-major W4 int8 x"]
        results["shapes"][f"{out}x{n_in}"] = {"ms": ms, "vs row-major": {n: base / v for n, v in ms.items()}}
        print(f"{out}x{n_in}:")
        for name, v in ms.items():
            print(f"  {name:<34} {v:7.3f} ms  {base / v:5.2f}x row-major")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
