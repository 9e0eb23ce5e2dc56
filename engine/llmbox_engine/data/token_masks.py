"""Token ids and loss masks for rendered texts: the fast tokenizer's offsets, or a cache of word chunks.

A token is trained on when its character offsets overlap a trained span. Three encoders compute that:

- `HFEncoder`: the transformers tokenizer call with offsets; works for any fast tokenizer.
- `RustEncoder`: the same through the `tokenizers` object directly, without transformers' per-example
  dict building. Used when the backend has no truncation or padding of its own (they would change ids).
- `ChunkEncoder`: byte-level BPE tokenizers split text into pre-tokens with a regex that never joins a
  non-space character to the space after it, and tokenize each pre-token on its own. So a text cut before
  every space that follows a non-space character tokenizes as the concatenation of its pieces ("chunks",
  mostly a space and a word), with the pieces' offsets shifted by their position. Natural text repeats
  its words, so chunk tokens come from a cache and only unseen chunks reach the tokenizer. It is used
  only for pipelines whose configuration makes this hold (`ChunkEncoder.supports`), and it is still
  compared against `RustEncoder` on the first texts and a sample after that; any difference turns it
  off for good. It also steps aside for data whose words hardly repeat, where the cache cannot pay.
"""

from __future__ import annotations

import json
import re
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from itertools import accumulate, chain
from operator import itemgetter
from typing import Any, Protocol, cast

import numpy as np

Span = tuple[int, int]
Encoded = tuple[np.ndarray, np.ndarray]  # int32 token ids, bool trainable

# Split pre-tokenizer patterns (Llama 3, Qwen 2) in which, like GPT-2's, a space only ever starts a pre-token.
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SAFE_SPLIT_PATTERNS = frozenset({_CONTRACTIONS + r"\p{N}{1,3}" + _REST, _CONTRACTIONS + r"\p{N}" + _REST})
# Before each space that follows a non-space character. Python's whitespace includes every Unicode
# White_Space character the tokenizers' regex knows, so a non-space here is a non-space there.
CHUNK_BOUNDARY = re.compile(r"(?<=\S) ")
SPACE_AFTER_WHITESPACE = re.compile(r"\s ")
VERIFY_FIRST = 16  # texts always compared against the tokenizer's own result
VERIFY_EVERY = 500  # and every this many after those
MAX_CACHED_CHUNKS = 100_000  # the cache is emptied beyond this: memory stays bounded (~40 MB)
GROUP_SIZE = 16  # unseen chunks tokenized together in one string
# Unseen chunks cost more than tokenizing whole texts (2.5x when no word repeats): when more than this share
# of a window's chunks were unseen, the data does not repeat enough and the reference takes over.
MAX_UNSEEN_SHARE = 0.35
UNSEEN_WINDOW = 200_000  # chunks


class Encoder(Protocol):
    def encode(self, texts: Sequence[str], spans: Sequence[Sequence[Span]], special: bool) -> list[Encoded]: ...


def encoder_for(tokenizer: Any) -> Encoder:
    """The fastest encoder that gives this tokenizer's own ids and masks."""
    if not RustEncoder.supports(tokenizer):
        return HFEncoder(tokenizer)
    rust = RustEncoder(tokenizer._tokenizer)
    if not ChunkEncoder.supports(tokenizer):
        return rust
    return ChunkEncoder(tokenizer._tokenizer, rust)


def mask_from_offsets(offsets: np.ndarray, spans: Sequence[Span]) -> np.ndarray:
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(offsets), dtype=bool)
    for s, e in spans:
        mask |= (ends > s) & (starts < e)
    return mask


class HFEncoder:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, texts: Sequence[str], spans: Sequence[Sequence[Span]], special: bool) -> list[Encoded]:
        encoded = self.tokenizer(list(texts), add_special_tokens=special, return_offsets_mapping=True)
        out = []
        for ids, offsets, text_spans in zip(encoded["input_ids"], encoded["offset_mapping"], spans, strict=True):
            offsets_array = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            out.append((np.asarray(ids, dtype=np.int32), mask_from_offsets(offsets_array, text_spans)))
        return out


class RustEncoder:
    def __init__(self, backend: Any) -> None:
        self.backend = backend

    @staticmethod
    def supports(tokenizer: Any) -> bool:
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is None or backend.truncation is not None or backend.padding is not None:
            return False
        # transformers sets this on every call; here it must already hold
        return bool(backend.encode_special_tokens) == bool(getattr(tokenizer, "split_special_tokens", False))

    def encode(self, texts: Sequence[str], spans: Sequence[Sequence[Span]], special: bool) -> list[Encoded]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=special)
        out = []
        for encoding, text_spans in zip(encodings, spans, strict=True):
            offsets = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)
            out.append((np.array(encoding.ids, dtype=np.int32), mask_from_offsets(offsets, text_spans)))
        return out


# A cached chunk: its token ids (int32 bytes), token count, character count, its tokens' offsets as a flat
# int32 array (start, end, start, end, ...: a fifth of the memory of a tuple of pairs), where the chunk
# starts in those offsets' frame (the string it was tokenized in, shared with other chunks), and its
# character and token counts packed into one int (characters << _SHIFT | tokens), so that one running
# sum gives both positions and still sorts by characters.
Chunk = tuple[bytes, int, int, "array[int]", int, int]
_SHIFT = 32
_TOKENS = (1 << _SHIFT) - 1


class ChunkEncoder:
    """Texts encoded chunk by chunk from a cache, checked against `reference` (see the module doc).

    A text is cut at its spaces (`str.split`, fast) when no space follows whitespace, else by the regex.
    The first part is a chunk as it is; every later part is a chunk with its space in front, cached by
    the part alone to save building the string.
    """

    def __init__(self, backend: Any, reference: Encoder) -> None:
        self.backend = backend
        self.reference = reference
        self.first: dict[str, Chunk] = {}  # a text's first part
        self.spaced: dict[str, Chunk] = {}  # a later part: the chunk is " " + part
        self.encoded = 0
        self.disabled = False
        self.window = [0, 0]  # chunks looked up, unseen among them

    @staticmethod
    def supports(tokenizer: Any) -> bool:
        if not RustEncoder.supports(tokenizer):
            return False
        # the pieces' own settings: serializing the whole tokenizer (vocabulary and all) takes a while
        backend = tokenizer._tokenizer
        pre_tokenizer = backend.pre_tokenizer
        return (
            backend.normalizer is None
            and type(backend.model).__name__ == "BPE"
            and getattr(backend.model, "dropout", None) is None
            and pre_tokenizer is not None
            and _safe_pre_tokenizer(json.loads(pre_tokenizer.__getstate__()))
            and all(_safe_added_token(t) for t in backend.get_added_tokens_decoder().values())
        )

    def encode(self, texts: Sequence[str], spans: Sequence[Sequence[Span]], special: bool) -> list[Encoded]:
        if special or self.disabled:  # special tokens added around the text: the reference handles those
            return self.reference.encode(texts, spans, special)
        parts = [_parts(text) for text in texts]
        return self._checked(texts, spans, self._assemble(self._lookup(parts), spans))

    def _lookup(self, parts: list[list[str]]) -> list[list[Chunk]]:
        """Each text's chunks from the cache, the unseen ones tokenized first."""
        if len(self.first) + len(self.spaced) > MAX_CACHED_CHUNKS:
            self.first.clear()
            self.spaced.clear()
        first, spaced = self.first.get, self.spaced.get
        looked = [list(map(spaced, p)) for p in parts]  # the first part's spaced lookup is wasted, but cheap
        for p, chunks in zip(parts, looked, strict=True):
            chunks[0] = first(p[0])
        # (text, chunk) of each unseen chunk: scanned for in C, a text at a time, since most have none
        holes = [(i, j) for i, chunks in enumerate(looked) if None in chunks for j in _indices_of_none(chunks)]
        unseen = [{parts[i][0] for i, j in holes if not j}, {parts[i][j] for i, j in holes if j}]
        if holes:
            self._add(self.first, list(unseen[0]), "")
            self._add(self.spaced, list(unseen[1]), " ")
            for i, j in holes:
                looked[i][j] = self.spaced[parts[i][j]] if j else self.first[parts[i][0]]
        self._count(sum(map(len, looked)), len(unseen[0]) + len(unseen[1]))
        return cast(list[list[Chunk]], looked)

    def _count(self, chunks: int, unseen: int) -> None:
        self.window[0] += chunks
        self.window[1] += unseen
        if self.window[0] >= UNSEEN_WINDOW:
            if self.window[1] > MAX_UNSEEN_SHARE * self.window[0]:
                self.disabled = True  # too few repeats to pay for the cache
                self.first.clear()
                self.spaced.clear()
            self.window = [0, 0]

    def _add(self, cache: dict[str, Chunk], keys: list[str], lead: str) -> None:
        """Tokenize unseen chunks. Spaced ones go several to a string (the tokenizer's cost is much per
        string): a chunk after one that ends in a non-space character starts at a pre-token boundary, so
        the string's tokens divide at the chunk boundaries; a group where they do not is redone alone."""
        texts = [lead + key for key in keys]
        groups = _groups(texts) if lead else [[text] for text in texts]
        if not groups:
            return
        encoded = self.backend.encode_batch(["".join(group) for group in groups], add_special_tokens=False)
        entries: list[Chunk] = []
        for group, encoding in zip(groups, encoded, strict=True):
            split = _divide(group, encoding.ids, encoding.offsets)
            if split is None:
                alone = self.backend.encode_batch(group, add_special_tokens=False)
                split = [_one(text, e.ids, e.offsets) for text, e in zip(group, alone, strict=True)]
            entries += split
        cache.update(zip(keys, entries, strict=True))

    def _assemble(self, looked: list[list[Chunk]], spans: Sequence[Sequence[Span]]) -> list[Encoded]:
        """The whole batch at once: one id buffer and one mask, cut into a view per text.

        Positions are batch-wide (each text's characters and tokens follow the previous text's), so the
        per-text work is little more than finding the chunks that hold its span boundaries.
        """
        chunks = list(chain.from_iterable(looked))
        last_chunks = [end - 1 for end in accumulate(map(len, looked))]  # index of each text's last chunk
        ids = np.frombuffer(bytearray().join(map(itemgetter(0), chunks)), dtype=np.int32)  # writable: a bytearray
        ends = list(accumulate(map(itemgetter(5), chunks)))  # characters and tokens in one sum: see Chunk
        mask = np.zeros(len(ids), dtype=bool)
        out: list[Encoded] = []
        lo = 0
        for hi, text_spans in zip(last_chunks, spans, strict=True):
            char_base, token_base = (ends[lo - 1] >> _SHIFT, ends[lo - 1] & _TOKENS) if lo else (0, 0)
            for s, e in text_spans:
                _mark_span(mask, s + char_base, e + char_base, chunks, ends, lo, hi)
            token_end = ends[hi] & _TOKENS
            out.append((ids[token_base:token_end], mask[token_base:token_end]))
            lo = hi + 1
        return out

    def _checked(self, texts: Sequence[str], spans: Sequence[Sequence[Span]], out: list[Encoded]) -> list[Encoded]:
        first = self.encoded
        self.encoded += len(texts)
        sample = [i for i in range(len(texts)) if first + i < VERIFY_FIRST or (first + i) % VERIFY_EVERY == 0]
        if not sample:
            return out
        expected = self.reference.encode([texts[i] for i in sample], [spans[i] for i in sample], False)
        for i, (ids, mask) in zip(sample, expected, strict=True):
            if not (np.array_equal(ids, out[i][0]) and np.array_equal(mask, out[i][1])):
                self.disabled = True  # the tokenizer does not split as assumed: the reference from now on
                return self.reference.encode(texts, spans, False)
        return out


def _indices_of_none(items: list[Any]) -> Iterator[int]:
    at = -1
    while True:
        try:
            at = items.index(None, at + 1)
        except ValueError:
            return
        yield at


def _groups(texts: list[str]) -> list[list[str]]:
    """Spaced chunks in runs to tokenize as one string: a run ends after a chunk ending in whitespace."""
    groups: list[list[str]] = []
    current: list[str] = []
    for text in texts:
        current.append(text)
        if len(current) == GROUP_SIZE or not text or text[-1].isspace():
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def _divide(group: list[str], ids: list[int], offsets: list[Span]) -> list[Chunk] | None:
    """The tokens of a group's string divided among its chunks; None if a token straddles a boundary."""
    starts = [start for start, _ in offsets]
    if starts != sorted(starts):
        return None
    bounds = list(accumulate(map(len, group), initial=0))
    cuts = [bisect_left(starts, bound) for bound in bounds[:-1]] + [len(ids)]
    for cut, bound in zip(cuts[1:-1], bounds[1:-1], strict=True):
        if cut and offsets[cut - 1][1] > bound:
            return None  # the token before the boundary reaches past it
        if cut < len(ids) and offsets[cut][0] == offsets[cut][1] == bound:
            return None  # an empty token on the boundary: which chunk it belongs to is unclear
    id_array = np.array(ids, dtype=np.int32)
    flat = array("i", chain.from_iterable(offsets))
    return [
        (id_array[a:b].tobytes(), b - a, len(text), flat[2 * a : 2 * b], bound, len(text) << _SHIFT | (b - a))
        for text, a, b, bound in zip(group, cuts, cuts[1:], bounds, strict=False)
    ]


def _one(text: str, ids: list[int], offsets: list[Span]) -> Chunk:
    flat = array("i", chain.from_iterable(offsets))
    return np.array(ids, dtype=np.int32).tobytes(), len(ids), len(text), flat, 0, len(text) << _SHIFT | len(ids)


def _parts(text: str) -> list[str]:
    """The text cut at each space that follows a non-space character, without those spaces."""
    if SPACE_AFTER_WHITESPACE.search(text) is None:
        return text.split(" ")
    return CHUNK_BOUNDARY.split(text)


def _mark_span(mask: np.ndarray, s: int, e: int, chunks: list[Chunk], ends: list[int], lo: int, hi: int) -> None:
    """Mark the tokens whose offsets overlap [s, e), exactly as `mask_from_offsets` would.

    Only chunks lo..hi (one text's) are looked at; `ends` are their packed running totals. The chunks
    strictly between the one holding s and the one holding e - 1 lie wholly inside the span; those two
    are checked token by token.
    """
    first = bisect_right(ends, (s << _SHIFT) | _TOKENS, lo, hi + 1)  # the first chunk ending after s
    last = min(bisect_left(ends, e << _SHIFT, lo, hi + 1), hi)  # the first ending at or after e
    if last > first + 1:
        mask[ends[first] & _TOKENS : ends[last - 1] & _TOKENS] = True
    for j in (first, last) if last > first else (last,):
        if j <= hi:
            char_start, token_start = (ends[j - 1] >> _SHIFT, ends[j - 1] & _TOKENS) if j else (0, 0)
            _mark_tokens(mask, s, e, chunks[j], char_start, token_start)


def _mark_tokens(mask: np.ndarray, s: int, e: int, chunk: Chunk, char_start: int, token_start: int) -> None:
    """One chunk's tokens that overlap [s, e), compared in the chunk's own frame of offsets."""
    flat = chunk[3]
    shift = char_start - chunk[4]
    s, e = s - shift, e - shift
    for k in range(0, len(flat), 2):
        if flat[k + 1] > s and flat[k] < e:
            mask[token_start + k // 2] = True


def _safe_added_token(token: Any) -> bool:
    """Added tokens are matched before pre-tokenization: one must never reach across a chunk boundary."""
    return " " not in token.content and not (token.lstrip or token.rstrip)


def _safe_pre_tokenizer(config: dict[str, Any]) -> bool:
    """Only the shapes analysed: GPT-2's byte-level regex, or a safe Split (or single digits) before byte level."""
    steps = config.get("pretokenizers") or [] if config.get("type") == "Sequence" else [config]
    if len(steps) == 1:
        return _is_byte_level(steps[0], regex=True)
    if len(steps) == 2 and _is_safe_split(steps[0]):
        return _is_byte_level(steps[1], regex=False)
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits"):
        return _is_byte_level(steps[1], regex=True)
    return False


def _is_byte_level(step: dict[str, Any], regex: bool) -> bool:
    return (
        step.get("type") == "ByteLevel"
        and not step.get("add_prefix_space", True)
        and step.get("use_regex", True) == regex
    )


def _is_safe_split(step: dict[str, Any]) -> bool:
    pattern = step.get("pattern") or {}
    return (
        step.get("type") == "Split"
        and pattern.get("Regex") in SAFE_SPLIT_PATTERNS
        and step.get("behavior") == "Isolated"
        and not step.get("invert", False)
    )
