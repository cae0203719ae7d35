"""Reading and writing checkpoints, adapter folders and configs."""
from splice.io.checkpoints import CheckpointReader, atomic_output_dir, read_json, save_safetensors_sharded, write_json

__all__ = ["CheckpointReader", "save_safetensors_sharded", "atomic_output_dir", "read_json", "write_json"]
