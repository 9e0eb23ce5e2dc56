"""The fast rendering paths give exactly what jinja and the tokenizer's own offsets give.

The compiled chat templates (one jinja render per role signature, then concatenation) and the chunk-cached
tokenizer must reproduce, token for token, the ids and loss masks of rendering every conversation with
jinja and tokenizing it whole; and each must step aside when its assumption does not hold.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmbox.model_facts import read_config
from llmbox_engine.data import Example, Message, Origin
from llmbox_engine.data import ingest as ingest_module
from llmbox_engine.data.compiled_template import VERIFY_FIRST, compile_conversation, content_is_opaque
from llmbox_engine.data.render import Renderer, chat_template_for
from llmbox_engine.data.token_masks import (
    ChunkEncoder,
    HFEncoder,
    RustEncoder,
    _divide,
    encoder_for,
)
from llmbox_handlers import CHATML_TEMPLATE, FAMILY_HANDLERS, GENERIC, match_handler

from tiny_models import FAMILIES, build_tokenizer

ORIGIN = Origin("test.json", 1)
AWKWARD = [
    "  leading and trailing spaces  ",
    "line one\n\nline two\n",
    "tabs\tand  double  spaces",
    "unicode: café, 東京, emoji 🙂, nbsp\u00a0here",
    "a literal <|im_end|> inside the content",
    " ",
    "digits 12345 and punctuation!?... (yes)",
]


def chat(*turns: tuple[str, str]) -> Example:
    return Example("openai", ORIGIN, messages=tuple(Message(r, c) for r, c in turns))


def conversations(seed: int = 0) -> list[Example]:
    """Single and multi-turn, with and without a system prompt, plain and awkward contents."""
    rng = random.Random(seed)
    out = [
        chat(("user", "What is 2+2?"), ("assistant", "4.")),
        chat(("system", "Be brief."), ("user", "Hello there"), ("assistant", "Hi.")),
        chat(("user", "One"), ("assistant", "Two"), ("user", "Three"), ("assistant", "Four")),
        chat(("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")),
    ]
    for i in range(40):
        turns: list[tuple[str, str]] = [("system", rng.choice(AWKWARD))] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            turns += [("user", rng.choice(AWKWARD) + f" question {i}"), ("assistant", rng.choice(AWKWARD))]
        out.append(chat(*turns))
    return out


def chunk_encoder(encoder: Any) -> ChunkEncoder:
    assert isinstance(encoder, ChunkEncoder)
    return encoder


def reference(tokenizer: Any, template: str, example: Example) -> tuple[np.ndarray, np.ndarray]:
    """Jinja for every render, the transformers tokenizer call for the offsets: the slow, plain path."""
    text, spans = Renderer(tokenizer, template, 4096)._render_with_jinja(example)
    return HFEncoder(tokenizer).encode([text], [spans], False)[0]


def assert_matches_reference(tokenizer: Any, template: str, examples: list[Example]) -> Renderer:
    renderer = Renderer(tokenizer, template, 4096)
    for example, got in zip(examples, renderer.tokenize(examples, chunk_size=7), strict=True):
        ids, mask = reference(tokenizer, template, example)
        assert got.input_ids.tolist() == ids.tolist(), example.messages
        assert got.trainable.tolist() == mask.tolist(), example.messages
    return renderer


@pytest.mark.parametrize("handler", [*FAMILY_HANDLERS, GENERIC], ids=lambda h: h.name)
def test_compiled_templates_match_jinja_for_every_handler_template(handler: Any) -> None:
    tokenizer = build_tokenizer(chat_template=None)
    renderer = assert_matches_reference(tokenizer, handler.chat_template, conversations())
    assert not chunk_encoder(renderer._encoder).disabled


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tiny_family_renders_exactly_as_jinja(family: str, tiny_model_factory: Callable[..., Path]) -> None:
    from transformers import AutoTokenizer

    folder = tiny_model_factory(family, chat_template=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = chat_template_for(tokenizer, match_handler(read_config(folder)).handler.chat_template)
    renderer = assert_matches_reference(tokenizer, template, conversations(seed=len(family)))
    assert renderer._compiler.enabled and renderer._compiler.fallbacks == []  # every handler template compiles


def test_smollm2_renders_exactly_as_jinja(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    renderer = assert_matches_reference(tokenizer, tokenizer.chat_template, conversations(seed=3))
    assert not chunk_encoder(renderer._encoder).disabled
    assert renderer._compiler.enabled and renderer._compiler.fallbacks == []


def test_a_template_that_trims_content_falls_back_to_jinja() -> None:
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    assert not content_is_opaque(template)  # the syntax tree shows the filter
    assert compile_conversation(("user", "assistant"), _template_fn(template)) is None  # and so would the probe
    example = chat(("user", "  padded question  "), ("assistant", "  padded answer\n"))
    renderer = assert_matches_reference(build_tokenizer(), template, [example])
    assert not renderer._compiler.enabled


def test_a_template_that_branches_on_content_is_caught_by_the_check() -> None:
    template = (
        "{% for m in messages %}{% if 'secret' in m['content'] %}[hidden]{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>{% endfor %}"
    )
    assert not content_is_opaque(template)
    assert compile_conversation(("user", "assistant"), _template_fn(template)) is not None  # the probe passes
    plain = [chat(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(VERIFY_FIRST - 1)]
    examples = [*plain, chat(("user", "the secret"), ("assistant", "ok"))]
    tokenizer = build_tokenizer()
    renderer = Renderer(tokenizer, template, 4096)
    renderer._compiler.enabled = True  # past the syntax check: the comparison with jinja must catch it
    for example, got in zip(examples, renderer.tokenize(examples), strict=True):
        ids, mask = reference(tokenizer, template, example)
        assert got.input_ids.tolist() == ids.tolist() and got.trainable.tolist() == mask.tolist()
    assert renderer._compiler.fallbacks == [("user", "assistant")]


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{{ m['content'] | trim }}{% endfor %}",
        "{% for m in messages %}{% if '</think>' in m.content %}x{% endif %}{{ m.content }}{% endfor %}",
        "{% for m in messages %}{{ m.content.split('</think>')[-1] }}{% endfor %}",
        "{% for c in messages | map(attribute='content') %}{{ c }}{% endfor %}",
        "{% for m in messages %}{% for k, v in m.items() %}{{ v }}{% endfor %}{% endfor %}",
        "{% macro show(m) %}{{ m.content }}{% endmacro %}{% for m in messages %}{{ show(m) }}{% endfor %}",
        "{% set ns = namespace(c='') %}{% for m in messages %}{% set ns.c = m.content %}{% endfor %}{{ ns.c }}",
        "{% for m in messages %}{{ m['content'][0] }}{% endfor %}",
        "{% for m in messages %}{% set c = m.content %}{{ c | upper }}{% endfor %}",
        "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
    ],
)
def test_templates_that_do_more_than_print_content_are_left_to_jinja(template: str) -> None:
    assert not content_is_opaque(template)


def test_serialising_whole_messages_is_caught_by_the_probe() -> None:
    template = "{% for m in messages %}{{ m | tojson }}{% endfor %}"  # the syntax check does not follow messages
    assert compile_conversation(("user", "assistant"), _template_fn(template)) is None  # escaping shows


def test_templates_that_print_content_or_test_it_compile() -> None:
    for template in [CHATML_TEMPLATE, *(h.chat_template for h in (*FAMILY_HANDLERS, GENERIC))]:
        assert content_is_opaque(template), template
    assert content_is_opaque(
        "{% for m in messages %}{% if m.content is string %}{{ m.content ~ '!' }}{% endif %}{% endfor %}"
    )


def test_empty_contents_are_part_of_the_signature() -> None:
    template = (
        "{% for m in messages %}{% if m['content'] %}<{{ m['role'] }}>{{ m['content'] }}"
        "{% else %}<{{ m['role'] }} empty>{% endif %}\n{% endfor %}"
    )
    assert content_is_opaque(template)
    examples = [
        chat(("system", ""), ("user", "q"), ("assistant", "a")),
        chat(("system", "s"), ("user", "q"), ("assistant", "a")),
        chat(("user", ""), ("assistant", "a")),
        chat(("user", "q"), ("assistant", "")),
    ]
    renderer = assert_matches_reference(build_tokenizer(), template, examples * 2)
    assert renderer._compiler.fallbacks == [] and len(renderer._compiler.signatures) == 4


def test_compiled_and_jinja_texts_and_spans_are_identical() -> None:
    renderer = Renderer(build_tokenizer(), CHATML_TEMPLATE, 512)
    for example in conversations(seed=5):
        assert renderer._render_conversation(example) == renderer._render_with_jinja(example)


def test_a_wrong_cached_chunk_turns_the_chunk_encoder_off() -> None:
    tokenizer = build_tokenizer()
    encoder = chunk_encoder(encoder_for(tokenizer))
    encoder.encode(["hello world"], [[(0, 5)]], False)
    ids, count, chars, offsets, base, packed = encoder.spaced["world"]
    lie = (ids + ids, count * 2, chars, offsets + offsets, base, packed + count)  # the check must catch it
    encoder.spaced["world"] = lie
    (got,) = encoder.encode(["hello world"], [[(0, 5)]], False)
    assert encoder.disabled
    expected = HFEncoder(tokenizer).encode(["hello world"], [[(0, 5)]], False)[0]
    assert got[0].tolist() == expected[0].tolist() and got[1].tolist() == expected[1].tolist()


def test_tokenizers_outside_the_analysed_shapes_get_no_chunk_cache() -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def wrap(tok: Any) -> Any:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")

    base = Tokenizer.from_str(build_tokenizer().backend_tokenizer.to_str())
    no_regex = Tokenizer.from_str(base.to_str())
    no_regex.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    normalized = Tokenizer.from_str(base.to_str())
    normalized.normalizer = normalizers.Lowercase()
    metaspace = Tokenizer(models.BPE())
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    for tok in (no_regex, normalized, metaspace):
        assert not ChunkEncoder.supports(wrap(tok))
        assert isinstance(encoder_for(wrap(tok)), RustEncoder)
    assert ChunkEncoder.supports(wrap(base))


def test_chunked_ids_and_masks_match_on_awkward_whitespace() -> None:
    tokenizer = build_tokenizer()
    texts = ["a  b", "x\n y", " lead", "trail ", "\u3000wide space", "tab\t end", "", "   ", "a b c d e f"]
    spans = [[(0, len(t))] if t else [] for t in texts] + [[(1, 3)] for t in texts]
    texts = texts + texts
    got = ChunkEncoder(tokenizer.backend_tokenizer, HFEncoder(tokenizer)).encode(texts, spans, False)
    want = HFEncoder(tokenizer).encode(texts, spans, False)
    for (a_ids, a_mask), (b_ids, b_mask) in zip(got, want, strict=True):
        assert a_ids.tolist() == b_ids.tolist() and a_mask.tolist() == b_mask.tolist()


def test_duplicates_are_exact_even_when_hashes_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest_module, "hash", lambda _: 0, raising=False)
    seen = ingest_module._Seen()
    a, b = chat(("user", "a"), ("assistant", "b")), chat(("user", "c"), ("assistant", "d"))
    assert seen.add(a) and seen.add(b)  # one hash, two contents: both kept
    assert not seen.add(chat(("user", "a"), ("assistant", "b"))) and not seen.add(b)


def _template_fn(template: str) -> Callable[[list[dict[str, str]], bool], str]:
    tokenizer = build_tokenizer()

    def render(messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return str(
            tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
            )
        )

    return render


def test_unseen_chunks_tokenized_together_equal_chunks_tokenized_alone() -> None:
    tokenizer = build_tokenizer()
    backend = tokenizer.backend_tokenizer
    keys = ["word", "two.", "x\n", "", "(1)?<|im_end|>\n<|im_start|>assistant\nThe", "a\u00a0", "end", "42", "é!"] * 3
    keys = list(dict.fromkeys(keys)) + [f"w{i}" for i in range(40)]
    encoder = ChunkEncoder(backend, HFEncoder(tokenizer))
    encoder._add(encoder.spaced, keys, " ")
    for key in keys:
        alone = backend.encode(" " + key, add_special_tokens=False)
        ids, count, chars, offsets, base, _ = encoder.spaced[key]
        assert (np.frombuffer(ids, dtype=np.int32).tolist(), count, chars) == (alone.ids, len(alone.ids), len(key) + 1)
        assert [x - base for x in offsets] == [x for pair in alone.offsets for x in pair]


def test_a_token_across_a_chunk_boundary_sends_the_group_back_to_one_by_one() -> None:
    assert _divide([" ab", " cd"], [1, 2], [(0, 4), (4, 6)]) is None
    assert _divide([" ab", " cd"], [1, 9, 2], [(0, 3), (3, 3), (3, 6)]) is None
    one, two = _divide([" ab", " cd"], [1, 2], [(0, 3), (3, 6)]) or []
    assert [(c[1], c[2], c[3].tolist(), c[4]) for c in (one, two)] == [(1, 3, [0, 3], 0), (1, 3, [3, 6], 3)]


@pytest.mark.parametrize("digits", [True, False], ids=["digits+byte-level", "llama3-split+byte-level"])
def test_the_other_analysed_pre_tokenizers_chunk_exactly(digits: bool) -> None:
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llmbox_engine.data.token_masks import SAFE_SPLIT_PATTERNS

    tok = Tokenizer.from_str(build_tokenizer().backend_tokenizer.to_str())
    if digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        pattern = Regex(sorted(SAFE_SPLIT_PATTERNS)[0])
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(pattern, behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    assert ChunkEncoder.supports(tokenizer)
    renderer = assert_matches_reference(tokenizer, CHATML_TEMPLATE, conversations(seed=9))
    assert not chunk_encoder(renderer._encoder).disabled


def test_text_that_never_repeats_goes_back_to_whole_text_tokenization(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmbox_engine.data import token_masks

    monkeypatch.setattr(token_masks, "UNSEEN_WINDOW", 50)
    tokenizer = build_tokenizer()
    encoder = chunk_encoder(encoder_for(tokenizer))
    texts = [" ".join(f"w{i}x{k}" for k in range(30)) for i in range(6)]
    spans = [[(3, 40)] for _ in texts]
    got = encoder.encode(texts[:3], spans[:3], False) + encoder.encode(texts[3:], spans[3:], False)
    assert encoder.disabled and not encoder.spaced  # every chunk was new: the cache did not pay, and is freed
    for (ids, mask), (want_ids, want_mask) in zip(got, HFEncoder(tokenizer).encode(texts, spans, False), strict=True):
        assert ids.tolist() == want_ids.tolist() and mask.tolist() == want_mask.tolist()
