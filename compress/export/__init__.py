"""Writing and reading model folders in compress's formats: dense (plain transformers safetensors),
compressed-tensors (``pack-quantized``, for vLLM), packed (compress's kernels) and one GGUF file (llama.cpp).
One module per format,
``streamed`` writes a prune run's output block by block, ``reading`` reads folders back; where and how
safely a folder is written is ``outputs``' concern."""

from compress.export import gguf
from compress.export.formats import CT_BITS, CT_GROUP_SIZES, FORMATS, check_format, check_layers, storage_bytes
from compress.export.reading import layer_table, read_metadata, read_packed_table, read_tensor, tensor_index
from compress.export.streamed import StreamedOutput

__all__ = ["gguf", "CT_BITS", "CT_GROUP_SIZES", "FORMATS", "StreamedOutput", "check_format", "check_layers", "layer_table", "read_metadata",
           "read_packed_table", "read_tensor", "storage_bytes", "tensor_index"]
