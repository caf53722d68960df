"""From generated tokens to the text a client sees: incremental decoding and stop strings.

`TextStream.update(tokens, finished)` takes every token generated so far and returns the new text to send. It holds
back an incomplete UTF-8 character and, while not finished, the last characters that could begin a stop string; when
a stop string appears, the text ends before it and `stopped` is set (the server then cancels the request).
"""
from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stops: list[str], eos_token_ids: set[int]):
        self.tokenizer, self.stops, self.eos = tokenizer, stops, eos_token_ids
        self.sent = ""
        self.stopped = False
        self.tokens: list[int] = []
        self._hold = max((len(s) for s in stops), default=1) - 1

    def update(self, tokens: list[int], finished: bool) -> str:
        """The text to send now (possibly empty)."""
        if self.stopped:
            return ""
        self.tokens = list(tokens)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        elif not finished:
            text = text.rstrip("\ufffd")  # a multi-byte character not complete yet
            text = text[:len(text) - self._hold] if self._hold else text
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def finish_reason(self, max_tokens: int) -> str:
        if self.stopped or (self.tokens and self.tokens[-1] in self.eos):
            return "stop"
        return "length" if len(self.tokens) >= max_tokens else "stop"
