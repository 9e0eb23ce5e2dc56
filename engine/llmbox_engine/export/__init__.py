"""`llmbox export`: a trained adapter made useful outside llmbox (merged HF weights, GGUF, a LoRA GGUF, Ollama)."""
