"""Group quantization of weights: the integer grid (``grid``), round-to-nearest and GPTQ (``gptq``).

Codes, scales and zero points are plain tensors; how they are stored on disk is ``export``'s business and
how they are packed for our kernels is ``kernels.formats``'.
"""

from compress.quant.grid import QuantGrid

__all__ = ["QuantGrid"]
