"""Planning a run before any weight is loaded: what it will need (memory) and what it will quantize."""
