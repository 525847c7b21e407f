"""Base models (assets, GGUF, hub, tiny) and the LoRA adapter pool."""
