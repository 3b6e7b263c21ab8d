"""Planning a run before any weight is loaded: what it will need (memory; disk and tensor sizes) and what it will
quantize."""
