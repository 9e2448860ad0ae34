"""Storage formats and (later) the project's CPU kernels for packed sparse and quantized weights."""
