"""Text of a growing sequence of tokens: incremental detokenization and stop strings."""

REPLACEMENT_CHAR = "\ufffd"  # what a decoder writes for bytes of a character not yet complete


def first_stop(text, stop_strings, start=0):
    """Index where the earliest stop string in text[start:] begins; len(text) if none does."""
    hits = [i for i in (text.find(s, start) for s in stop_strings) if i >= 0]
    return min(hits, default=len(text))


class TextTracker:
    """The decoded text of one growing sequence, updated per token. Like vLLM's incremental
    detokenizer, it re-decodes only the tokens since the last complete piece of text, and holds text
    back while it ends in an incomplete character (a trailing U+FFFD)."""

    def __init__(self, tokenizer, stop_strings):
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.ids = []
        self.text = ""
        self.stop_at = None  # index in text where the first stop string begins
        self._prefix = 0  # ids[_prefix:_read]: tokens already in text, decoded again as context
        self._read = 0

    @property
    def stopped(self):
        return self.stop_at is not None

    def push(self, token):
        self.ids.append(token)
        decode = self.tokenizer.decode
        known = decode(self.ids[self._prefix : self._read])
        extended = decode(self.ids[self._prefix :])
        if len(extended) > len(known) and not extended.endswith(REPLACEMENT_CHAR):
            searched = len(self.text)
            self.text += extended[len(known) :]
            self._prefix, self._read = self._read, len(self.ids)
            if self.stop_strings and self.stop_at is None:
                # A new match must end in the new text, so it begins at most len(stop) - 1 before it.
                start = max(0, searched - max(map(len, self.stop_strings)) + 1)
                at = first_stop(self.text, self.stop_strings, start)
                self.stop_at = at if at < len(self.text) else None

    def shown_text(self):
        """The text that is safe to show: before any stop string, and without a tail that could
        turn out to be the start of one."""
        if self.stop_at is not None:
            return self.text[: self.stop_at]
        return self.text[: len(self.text) - _partial_stop_length(self.text, self.stop_strings)]

    def final_text(self):
        """All tokens decoded at once (the reference), cut before the first stop string."""
        text = self.tokenizer.decode(self.ids)
        return text[: first_stop(text, self.stop_strings)]


def _partial_stop_length(text, stop_strings):
    """Length of the longest tail of text that is a proper prefix of a stop string."""
    for length in range(min(len(text), max(map(len, stop_strings), default=1) - 1), 0, -1):
        tail = text[-length:]
        if any(s.startswith(tail) for s in stop_strings):
            return length
    return 0
