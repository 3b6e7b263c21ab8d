"""Writing checkpoints: where they may go (output: checked before the run, swapped in at the end), safetensors shards
written as tensors arrive, and the streamed run's final assembly."""
