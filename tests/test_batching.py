"""Batches without padding to a fixed length: token-budget length grouping, and packing that keeps examples apart."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from llmbox_engine.data.batching import packed_batch, padded_batch, split_to_budget, token_budget_batches
from llmbox_engine.data.render import IGNORE_INDEX, TokenizedExample

from tiny_models import FAMILIES


def example(ids: list[int], trainable: list[bool] | None = None) -> TokenizedExample:
    mask = np.asarray(trainable if trainable is not None else [True] * len(ids), dtype=bool)
    return TokenizedExample(np.asarray(ids, dtype=np.int32), mask)


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths) / computed


def test_token_budget_batches_cover_every_example_once_within_budget() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 700) for _ in range(400)]
    batches = token_budget_batches(lengths, max_tokens=2048, max_batch_size=16, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(400))
    for batch in batches:
        assert len(batch) <= 16
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 2048


def test_length_grouping_pads_far_less_than_random_batches() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(34, 717) for _ in range(400)]
    grouped = token_budget_batches(lengths, max_tokens=8 * 717, max_batch_size=8, seed=1)
    order = list(range(400))
    rng.shuffle(order)
    shuffled = [order[i : i + 8] for i in range(0, 400, 8)]
    assert padding_fraction(lengths, grouped) < 0.05 < 0.3 < padding_fraction(lengths, shuffled)


def test_batch_order_is_shuffled_by_seed_and_reproducible() -> None:
    lengths = list(range(1, 201))
    a = token_budget_batches(lengths, 64, 8, seed=1)
    assert a == token_budget_batches(lengths, 64, 8, seed=1)
    assert a != token_budget_batches(lengths, 64, 8, seed=2)
    assert token_budget_batches(lengths, 64, 8, seed=None)[0][0] == 0  # unshuffled: shortest first


def test_an_example_longer_than_the_budget_gets_its_own_batch() -> None:
    assert token_budget_batches([10, 500, 12], max_tokens=100, max_batch_size=8) == [[0, 2], [1]]


def test_padded_batch_masks_padding_out_of_attention_and_loss() -> None:
    batch = padded_batch([example([5, 6, 7], [False, True, True]), example([8])], pad_token_id=0, multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 6, 7, IGNORE_INDEX],
        [8, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
    ]


def test_packed_batch_restarts_positions_and_masks_each_boundary() -> None:
    batch = packed_batch([example([1, 2, 3]), example([4, 5], [False, True]), example([6, 7])])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    # no label at an example's first token: it would be predicted from the previous example's last one
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5, IGNORE_INDEX, 7]]


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_examples_do_not_attend_to_each_other(family: str, tiny_model_factory: Callable[..., Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory(family), attn_implementation="sdpa").eval()
    rng = np.random.default_rng(0)
    examples = [example(rng.integers(10, 400, n).tolist(), (rng.random(n) > 0.3).tolist()) for n in (9, 17, 5)]
    packed = packed_batch(examples)
    separate_loss_sum, separate_count = 0.0, 0
    with torch.no_grad():
        packed_logits = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits
        offset = 0
        for ex in examples:
            ids = torch.from_numpy(ex.input_ids.astype(np.int64))[None]
            logits = model(input_ids=ids, use_cache=False).logits
            assert torch.allclose(packed_logits[0, offset : offset + len(ex)], logits[0], atol=1e-4)
            labels = torch.tensor(ex.labels)[None]
            separate_loss_sum += torch.nn.functional.cross_entropy(
                logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            separate_count += int((labels[0, 1:] != IGNORE_INDEX).sum())
            offset += len(ex)
        labels = packed["labels"]
        packed_loss_sum = torch.nn.functional.cross_entropy(
            packed_logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
    assert int((labels[0, 1:] != IGNORE_INDEX).sum()) == separate_count
    assert packed_loss_sum == pytest.approx(separate_loss_sum, rel=1e-5)


def test_a_batch_splits_into_passes_within_the_token_budget() -> None:
    lengths = [100, 200, 300, 400, 500, 900]
    assert split_to_budget([0, 1, 2, 3, 4], lengths, 1000) == [[0, 1, 2], [3, 4]]  # 3 x 300, then 2 x 500
    assert split_to_budget([0, 1, 2], lengths, 10_000) == [[0, 1, 2]]
    assert split_to_budget([4, 5], lengths, 800) == [[4], [5]]  # a row over the budget runs alone
    rng = random.Random(3)
    many = [rng.randint(1, 700) for _ in range(200)]
    for batch in token_budget_batches(many, max_tokens=8 * 700, max_batch_size=8, seed=0):
        passes = split_to_budget(batch, many, 2048)
        assert [i for piece in passes for i in piece] == batch  # every row once, in order
        assert all(len(p) == 1 or len(p) * max(many[i] for i in p) <= 2048 for p in passes)


def test_packed_passes_are_budgeted_by_their_real_tokens() -> None:
    lengths = [100, 200, 300, 400, 500, 900]
    # a packed pass costs the sum of its rows: 100 + 200 + 300 + 400 = 1000, where padded it is 4 x 400
    assert split_to_budget([0, 1, 2, 3, 4], lengths, 1000, packed=True) == [[0, 1, 2, 3], [4]]
    assert split_to_budget([4, 5, 0], lengths, 1000, packed=True) == [[4], [5, 0]]  # 900 + 100 fits
    rng = random.Random(4)
    many = [rng.randint(1, 700) for _ in range(200)]
    for batch in token_budget_batches(many, max_tokens=16 * 700, max_batch_size=16, seed=0):
        passes = split_to_budget(batch, many, 2048, packed=True)
        assert [i for piece in passes for i in piece] == batch
        assert all(len(p) == 1 or sum(many[i] for i in p) <= 2048 for p in passes)
        # greedy: a pass is cut only when the next row would not fit
        assert all(sum(many[i] for i in p) + many[q[0]] > 2048 for p, q in itertools.pairwise(passes))
