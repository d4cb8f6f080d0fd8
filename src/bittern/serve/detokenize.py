"""Incremental detokenization with stop strings: token ids in, safe-to-send text deltas out.

Text is only released once it can no longer change: a trailing incomplete UTF-8 sequence (decoded
as U+FFFD) and any tail that could still grow into a stop string are held back until the next token
settles them. When a stop string appears, the text before it is released and the stream ends.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class Decoder(Protocol):
    """What :class:`IncrementalDecoder` needs from a tokenizer."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, honouring ``stop`` strings."""

    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that is now final (may be empty). Sets :attr:`stopped`."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        if self.stop:
            # a stop string can only start in the part not yet sent, or straddle its boundary
            search_from = max(0, self.sent - max(len(s) for s in self.stop) + 1)
            cuts = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if cuts:
                cut = max(min(cuts), self.sent)
                self.stopped = True
                return self._release(cut)
        end = len(self.text)
        while end > self.sent and self.text[end - 1] == "\ufffd":
            end -= 1
        end -= self._stop_prefix_len(self.text[self.sent:end])
        return self._release(end)

    def flush(self) -> str:
        """The held-back text once generation has ended for another reason (EOS, length)."""
        if self.stopped:
            return ""
        self.stopped = True
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def _stop_prefix_len(self, pending: str) -> int:
        """Length of the longest tail of ``pending`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(pending)), best, -1):
                if pending.endswith(s[:n]):
                    best = n
                    break
        return best
