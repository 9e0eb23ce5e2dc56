"""`llmbox serve --engine vllm`: vLLM's own OpenAI server, launched and supervised; never in the token path.

Torch-free on purpose: it runs in whichever Python holds vLLM (the vLLM image, or a virtualenv of its own).
"""
