"""`serve`: an OpenAI-compatible server for the base model and its trained LoRA adapter.

    server.py      start-up: HTTP first (/health says "loading"), then the weights, the adapter and the watcher
    app.py         the HTTP layer (Starlette): keys, body limits, JSON or server-sent events, disconnects
    service.py     model ids, /v1/models, and requests turned into generation jobs
    schemas.py     request bodies, checked strictly;  errors.py  OpenAI-style error bodies
    prompts.py     chat template and tokenization, as training renders them, and the end-of-turn tokens
    generation.py  the worker thread: continuous batching, per-row sampling and stopping, adapter swaps
    kv.py          KV-cache surgery for the batch;  sampling.py  next tokens;  text.py  streamed text
    adapters.py    reading and checking lora/, and watching it for a new one
    loading.py     the base model and tokenizers

Model ids: `<name>` is the base model, `<name>:lora` the adapter (name: the model directory's).
Hot reload: a request runs to its end on the adapter it was admitted with; requests admitted after a swap
get the new one. Nothing is unloaded when lora/ disappears (training renames it in two steps).
"""
