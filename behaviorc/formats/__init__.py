"""File formats: steering files (safetensors, GGUF) and safetensors reading."""
