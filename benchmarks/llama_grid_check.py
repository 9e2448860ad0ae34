"""Does compress's searched grid reproduce llama.cpp's imatrix Q4_0, given llama.cpp's own importance matrix?

Each Q4_0 decoder tensor of ``llama-quantize --imatrix`` (``Q4``) is compared with ``QuantGrid.fit`` (w4g32,
search, fp16 scales) of the F32 file's tensor (``F32``, llama.cpp's converter) weighted by the importance
matrix file's ``in_sum2 / counts`` (``IMATRIX``); prints the share of equal weights and the worst tensors.
The files are those ``gguf_quality.py`` leaves in its work folder (session 16: 99.96% of weights equal).

    python benchmarks/llama_grid_check.py W/dense-f32.gguf W/imatrix.gguf W/llama-q4_0-imatrix.gguf
"""

from __future__ import annotations

import sys

import gguf
import numpy as np
import torch

from compress.config import QuantConfig
from compress.quant.grid import QuantGrid


def main(f32: str, imatrix: str, q4: str) -> None:
    importance = {t.name: np.array(t.data) for t in gguf.GGUFReader(imatrix).tensors}
    dense = {t.name: t for t in gguf.GGUFReader(f32).tensors}
    cfg = QuantConfig.parse("w4g32", scale="search", method="rtn")
    equal = total = 0
    tensors = []
    for t in gguf.GGUFReader(q4).tensors:
        if t.tensor_type.name != "Q4_0" or not t.name.startswith("blk."):
            continue
        W = torch.from_numpy(np.array(dense[t.name].data, dtype=np.float32))  # (out, in)
        d = importance[t.name + ".in_sum2"].reshape(-1) / importance[t.name + ".counts"].reshape(-1)[0]  # (in,)
        ours = QuantGrid.fit(W, cfg, torch.float16, importance=torch.from_numpy(d.astype(np.float32))).round(W)
        theirs = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float().reshape(ours.shape)
        same = ours == theirs
        equal, total = equal + int(same.sum()), total + same.numel()
        tensors.append((same.reshape(same.shape[0], -1, 32).all(-1).float().mean().item(), t.name))
    print(f"weights equal: {equal / total:.5f} of {total}")
    print("groups equal, worst tensors:", sorted(tensors)[:5])


if __name__ == "__main__":
    main(*sys.argv[1:4])
