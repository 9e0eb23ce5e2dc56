"""Turning generated token ids into text as they come, with stop strings cut off before they are ever sent.

Decoding is incremental (a short window of ids, not the whole answer each token), and text is held back
while it may still change: an incomplete UTF-8 character, or the start of a stop string. Streamed pieces
therefore join to exactly the non-streamed answer.
"""

from __future__ import annotations

from typing import Any


class TextTracker:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` already handed out
        self._prefix_start = 0  # decoding window: ids[_prefix_start:_read_start] give the context of new ids
        self._read_start = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token: int) -> str:
        """Add one generated token; return the text now safe to send (empty if none). Sets `stopped`."""
        self.ids.append(token)
        prefix = self._decode(self.ids[self._prefix_start : self._read_start])
        full = self._decode(self.ids[self._prefix_start :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self._prefix_start, self._read_start = self._read_start, len(self.ids)
        return self._release()

    def finish(self) -> str:
        """The rest of the text, held back or not, when generation ends for another reason than a stop string."""
        if self.stopped:
            return ""
        prefix = self._decode(self.ids[self._prefix_start : self._read_start])
        full = self._decode(self.ids[self._prefix_start :])
        if len(full) > len(prefix):
            self.text += full[len(prefix) :]
            self._prefix_start = self._read_start = len(self.ids)
        rest = self.text[self.sent :]
        self.sent = len(self.text)
        return rest

    def _release(self) -> str:
        end = len(self.text)
        if self.stop:
            longest = max(len(s) for s in self.stop)
            search_from = max(0, self.sent - longest + 1)
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                end = len(self.text)
            else:
                end -= _held_back(self.text, self.stop, longest)
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece


def _held_back(text: str, stops: tuple[str, ...], longest: int) -> int:
    """Length of the longest end of `text` that a stop string starts with."""
    for size in range(min(longest - 1, len(text)), 0, -1):
        tail = text[-size:]
        if any(s.startswith(tail) for s in stops):
            return size
    return 0
