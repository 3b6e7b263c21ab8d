"""Loading a model: where it comes from, checked first (source), its files read by their headers only (headers: sizes,
truncated or missing shards), safetensors shards read tensor by tensor (shards), a meta-device skeleton filled block by
block (skeleton)."""
