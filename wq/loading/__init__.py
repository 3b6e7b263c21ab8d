"""Loading a model part by part: safetensors shards read tensor by tensor, a meta-device skeleton filled block by block."""
