"""Writing checkpoints: safetensors shards written as tensors arrive, and the streamed run's final assembly."""
