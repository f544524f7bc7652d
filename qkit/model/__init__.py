"""Model I/O: load causal LMs (HF directories, single safetensors, GGUF), stream their weights, write outputs."""
