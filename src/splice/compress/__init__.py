"""Compress deltas and extract LoRA adapters from full fine-tunes.

    deltas = splice.compress.open_deltas("my-adapter")              # or a full model with base="default"
    small, report = splice.compress.compress(deltas, "dare,quantize", density=0.1, bits=4)
    print(report.format())
    splice.compress.save_compressed(small, "my-adapter-small")      # `splice apply` / `splice merge` read it
    splice.compress.extract("default", "my-full-finetune", "my-lora", rank=16)

Methods (one file each in `methods/`): magnitude, dare, darex, compeft, quantize, svd, delta_come.
"""
from splice.compress.codec import CTensor, Packed, QTensor
from splice.compress.extract import extract
from splice.compress.inputs import open_deltas
from splice.compress.pipeline import CompressReport, compress
from splice.compress.registry import compressor_names, get_compressor
from splice.compress.storage import compressed_deltaset, is_compressed, load_compressed, save_compressed

__all__ = ["CTensor", "CompressReport", "Packed", "QTensor", "compress", "compressed_deltaset", "compressor_names",
           "extract", "get_compressor", "is_compressed", "load_compressed", "open_deltas", "save_compressed"]
