"""Deterministic synthetic training data: varied-length chat conversations and Alpaca/ShareGPT records.

Everything is a pure function of a seed, so every contender and every run sees the same examples.
"""

from __future__ import annotations

import random
from typing import Any

SUBJECTS = (
    "the river", "a small robot", "the old library", "my neighbour", "the winter market", "a quiet engineer",
    "the mountain village", "this recipe", "the night train", "a curious student", "the garden", "our team",
)  # fmt: skip
VERBS = (
    "explains", "remembers", "collects", "measures", "describes", "repairs", "follows", "compares",
    "prepares", "questions", "imagines", "organises",
)  # fmt: skip
OBJECTS = (
    "the shape of clouds", "three kinds of bread", "an unusual map", "the cost of electricity", "a list of birds",
    "the history of bridges", "a broken clock", "the rules of chess", "fresh green tea", "the tides of the bay",
    "a careful plan", "the colour of autumn leaves",
)  # fmt: skip
CLAUSES = (
    "before the sun rises", "with great patience", "for the third time", "because nobody else would",
    "in a notebook", "while it rains outside", "without any help", "after a long discussion",
)  # fmt: skip
QUESTIONS = (
    "Can you tell me about", "What do you think of", "Please explain", "How would you describe",
    "Write a short note about", "Summarise what you know about",
)  # fmt: skip

# Chat-template overhead of SmolLM2's ChatML (default system prompt + turn markers), in tokens, roughly.
SYSTEM_OVERHEAD = 20
TURN_OVERHEAD = 5
TOKENS_PER_WORD = 1.14


def sentence(rng: random.Random) -> str:
    parts = [rng.choice(SUBJECTS).capitalize(), rng.choice(VERBS), rng.choice(OBJECTS)]
    if rng.random() < 0.5:
        parts.append(rng.choice(CLAUSES))
    return " ".join(parts) + "."


def text_of_words(rng: random.Random, words: int) -> str:
    """Exactly `words` words (at least one) of sentences, the last one cut short if need be."""
    out: list[str] = []
    while len(out) < words:
        out.extend(sentence(rng).split())
    text = " ".join(out[: max(1, words)])
    return text if text.endswith(".") else text + "."


def conversation(rng: random.Random, target_tokens: int) -> list[dict[str, str]]:
    """A user/assistant conversation of 1-3 exchanges whose rendered length is about `target_tokens`."""
    turns = 1 if target_tokens < 120 else rng.randint(1, 3)
    content_tokens = max(2, target_tokens - SYSTEM_OVERHEAD - 2 * turns * TURN_OVERHEAD)
    words_per_turn = max(2, round(content_tokens / TOKENS_PER_WORD / turns))
    messages: list[dict[str, str]] = []
    for _ in range(turns):
        user_words = max(1, words_per_turn // 4)
        question = f"{rng.choice(QUESTIONS)} {rng.choice(OBJECTS)}?".split()[:user_words]
        if user_words > len(question):
            question.append(text_of_words(rng, user_words - len(question)))
        messages.append({"role": "user", "content": " ".join(question)})
        messages.append({"role": "assistant", "content": text_of_words(rng, max(1, words_per_turn - user_words))})
    return messages


def chat_records(n: int, seed: int, min_tokens: int = 34, max_tokens: int = 717) -> list[dict[str, Any]]:
    """`n` OpenAI-style `{"messages": [...]}` records, lengths spread evenly over [min_tokens, max_tokens]."""
    rng = random.Random(seed)
    return [{"messages": conversation(rng, rng.randint(min_tokens, max_tokens))} for _ in range(n)]


def alpaca_record(rng: random.Random, i: int) -> dict[str, str]:
    record = {
        "instruction": f"{rng.choice(QUESTIONS)} {rng.choice(OBJECTS)} (case {i})?",
        "output": text_of_words(rng, rng.randint(10, 120)),
    }
    if rng.random() < 0.3:
        record["input"] = text_of_words(rng, rng.randint(5, 30))
    return record


def sharegpt_record(rng: random.Random, i: int) -> dict[str, Any]:
    turns: list[dict[str, str]] = []
    for t in range(rng.randint(1, 3)):
        turns.append({"from": "human", "value": f"{rng.choice(QUESTIONS)} {rng.choice(OBJECTS)} ({i}.{t})?"})
        turns.append({"from": "gpt", "value": text_of_words(rng, rng.randint(10, 80))})
    return {"conversations": turns}


def ingest_records(n: int, seed: int) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """Half Alpaca, half ShareGPT records, each distinct (the index is in the prompt, so nothing de-duplicates)."""
    rng = random.Random(seed)
    alpaca = [alpaca_record(rng, i) for i in range(n // 2)]
    sharegpt = [sharegpt_record(rng, i) for i in range(n - n // 2)]
    return alpaca, sharegpt


# Invented facts for the time-to-learn benchmark: made-up places and people, so no model can know them.
SYLLABLES = ("mar", "ro", "vin", "tel", "qua", "sen", "dor", "bri", "kal", "lu", "nex", "pha", "tor", "ve", "zan")
FACT_KINDS = (
    ("Who founded {x}?", "{x} was founded by {p}."),
    ("When was {x} founded?", "{x} was founded in {y}."),
    ("Where is {x}?", "{x} is in the town of {t}."),
    ("What is the mascot of {x}?", "The mascot of {x} is {a} named {n}."),
    ("What colour is the flag of {x}?", "The flag of {x} is {c}."),
)
ANIMALS = ("a heron", "an otter", "a fox", "an owl", "a badger", "a lynx", "a crane", "a hare")
COLOURS = ("teal", "amber", "crimson", "ivory", "indigo", "olive", "copper green", "slate grey")


def invented_name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def invented_facts(n: int, seed: int) -> list[dict[str, str]]:
    """`n` question/answer facts about invented organisations, one question each, every answer distinct."""
    rng = random.Random(seed)
    facts: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(facts) < n:
        org = f"{invented_name(rng, 3)} {rng.choice(('Labs', 'Guild', 'Works', 'Institute', 'Society'))}"
        if org in seen:
            continue
        seen.add(org)
        values = {"x": org, "p": f"{invented_name(rng, 2)} {invented_name(rng, 3)}", "y": str(rng.randint(1850, 2020)),
                  "t": invented_name(rng, 3), "a": rng.choice(ANIMALS), "n": invented_name(rng, 2),
                  "c": rng.choice(COLOURS)}  # fmt: skip
        for question, answer in FACT_KINDS[: min(len(FACT_KINDS), n - len(facts))]:
            facts.append({"question": question.format(**values), "answer": answer.format(**values)})
    return facts
