"""Training: the LoRA recipe, auto-stop rules, checkpoints and artifacts."""
