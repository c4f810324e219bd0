"""Generated tokens to text as they come: incremental decoding with OpenAI's stop strings."""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    """Turns the growing list of a request's generated tokens into text deltas.

    Each `update` decodes the tokens so far and returns the text not yet given out, holding back
    an incomplete UTF-8 character and any tail that could be the start of a stop string. When a
    stop string appears, the text ends just before it and `stopped` becomes True (the caller then
    cancels the request, as OpenAI's API returns no text past a stop string).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.text = ""  # given out so far
        self.stopped = False

    def update(self, tokens: Sequence[int], final: bool = False) -> str:
        """The new text for `tokens` (all generated tokens so far); `final` flushes what was held back."""
        if self.stopped:
            return ""
        decoded = self.tokenizer.decode(tokens, skip_special_tokens=True)
        end = len(decoded)
        cut = self._first_stop(decoded)
        if cut is not None:
            end, self.stopped = cut, True
        elif not final:
            if decoded.endswith("\ufffd"):  # a character split across tokens
                end -= 1
            end -= self._stop_prefix_tail(decoded[:end])
        delta = decoded[len(self.text):end] if end > len(self.text) else ""
        self.text += delta
        return delta

    def _first_stop(self, decoded: str) -> int | None:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        found = [i for i in (decoded.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _stop_prefix_tail(self, decoded: str) -> int:
        """Length of the longest tail of `decoded` that begins some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(decoded)), longest, -1):
                if decoded.endswith(s[:n]):
                    longest = n
                    break
        return longest
