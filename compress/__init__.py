"""compress: post-training compression of causal language models (pruning, quantization, packing)."""

__version__ = "0.1.0"
