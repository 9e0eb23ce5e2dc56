"""The baseline of `make bench-learn`: the LoRA loop a practitioner writes in twenty lines with plain peft.

    python benchmarks/plain_loop.py MODEL_DIR FACTS.json OUTPUT_DIR [--epochs 10] [--ask-each-epoch]

LoRA r8 (alpha 16, dropout 0.05) on every projection, batch 1, AdamW at 2e-4, the loss on the answer's tokens,
examples shuffled every epoch, fp32, then the adapter saved. Timed from the outside as one whole command.

With --ask-each-epoch (the benchmark's "as many epochs as it needs") it saves OUTPUT/epoch-N after every epoch,
prints the seconds a command stopped there would have taken, and waits for `go` or `stop` on stdin while the
benchmark checks that adapter's recall; the waits are left out of the seconds it prints.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import psutil
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("facts")
    parser.add_argument("output")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--ask-each-epoch", action="store_true", help="save OUTPUT/epoch-N, then go on or stop")
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets))
    examples = []
    for fact in json.loads(Path(args.facts).read_text()):
        question = [{"role": "user", "content": fact["question"]}]
        prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
        answered = [*question, {"role": "assistant", "content": fact["answer"]}]
        full = tokenizer.apply_chat_template(answered, tokenize=False)
        ids = tokenizer(full, add_special_tokens=False, return_tensors="pt").input_ids
        labels = ids.clone()
        labels[:, : len(tokenizer(prompt, add_special_tokens=False).input_ids)] = -100
        examples.append((ids, labels))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    model.train()
    waited = 0.0  # seconds spent waiting for the benchmark's verdict: not training time
    for epoch in range(args.epochs):
        random.Random(epoch).shuffle(examples)
        total = 0.0
        for ids, labels in examples:
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item()
        if args.ask_each_epoch:
            model.save_pretrained(f"{args.output}/epoch-{epoch + 1}")
        # seconds since this process started: what a whole command stopped after this epoch would have taken
        since_start = time.time() - psutil.Process().create_time() - waited
        print(f"epoch {epoch + 1}: loss {total / len(examples):.4f} at {since_start:.1f} s", flush=True)
        if args.ask_each_epoch:
            asked = time.time()
            verdict = sys.stdin.readline().strip()
            waited += time.time() - asked
            if verdict != "go":
                return
    model.save_pretrained(args.output)


if __name__ == "__main__":
    main()
