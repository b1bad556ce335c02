"""Structured output: what a decoder may generate (a JSON object, JSON matching a schema, a regex,
one of several strings, a Lark or GBNF grammar), enforced token by token.

The grammar work is llguidance's (docs/DESIGN.md says why): it compiles the constraint and, after
each token, computes the bitmask of tokens that may come next. The core applies the mask before
sampling, so greedy, temperature, top-k/top-p and penalties all see only allowed tokens, and a
constrained request shares its batch with unconstrained ones. The next mask is computed on the
engine's dispatcher thread while the core runs the next forward pass.
"""

import json

_EXCLUSIVE = ("response_format", "regex", "choice", "grammar")


def grammar_for(response_format=None, regex=None, choice=None, grammar=None):
    """The llguidance grammar of a request's constraint, or None when it has none. ValueError names
    what is wrong with a constraint."""
    given = [name for name, value in zip(_EXCLUSIVE, (response_format, regex, choice, grammar)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"pass at most one of {', '.join(_EXCLUSIVE)}; got {', '.join(given)}")
    if not given:
        return None
    from llguidance import LLMatcher

    if response_format is not None:
        source = _response_format_grammar(response_format)
    elif regex is not None:
        if not isinstance(regex, str) or not regex:
            raise ValueError("regex must be a non-empty str")
        source = LLMatcher.grammar_from_regex(regex)
    elif choice is not None:
        if not isinstance(choice, (list, tuple)) or not choice or not all(isinstance(c, str) and c for c in choice):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        source = LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choice))
    else:
        source = _grammar_text(grammar)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(source)
    if is_error:
        raise ValueError(f"invalid {given[0]}: {messages[0]}")
    return source


def _response_format_grammar(response_format):
    from llguidance import LLMatcher

    if not isinstance(response_format, dict) or "type" not in response_format:
        raise ValueError('response_format must be a dict with a "type" ("text", "json_object" or "json_schema")')
    kind = response_format["type"]
    if kind == "text":
        return LLMatcher.grammar_from_lark('start: /(.|\\n)*/')
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_DEFAULTS)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ValueError('response_format "json_schema" needs {"json_schema": {"name": ..., "schema": {...}}}')
        schema = spec.get("schema", {})
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_DEFAULTS)
        except (ValueError, TypeError) as e:
            raise ValueError(f"invalid JSON schema: {e}") from None
    raise ValueError(f'response_format type must be "text", "json_object" or "json_schema", got {kind!r}')


# JSON as json.dumps writes it (", " and ": ", no other whitespace): readable, and few tokens.
_JSON_DEFAULTS = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def _grammar_text(grammar):
    from llguidance import LLMatcher, gbnf_to_lark

    if not isinstance(grammar, str) or not grammar.strip():
        raise ValueError("grammar must be a non-empty str (Lark or GBNF)")
    if "::=" in grammar:  # GBNF, llama.cpp's grammar syntax
        try:
            grammar = gbnf_to_lark.gbnf_to_lark(grammar)
        except Exception as e:
            raise ValueError(f"invalid GBNF grammar: {e}") from None
    return LLMatcher.grammar_from_lark(grammar)


class Constraint:
    """One request's matcher: the mask of its first token, then of each next one."""

    def __init__(self, model, grammar):
        from llguidance import LLMatcher

        self.matcher = LLMatcher(_llg_tokenizer(model), grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"the constraint cannot start: {self.matcher.get_error()}")

    def mask(self):
        """The allowed tokens for the next position: little-endian 32-bit words, one bit a token."""
        return self.matcher.compute_bitmask()

    def advance(self, token):
        """Takes the sampled token; True while more tokens are needed, False once the constraint
        is complete (only the end of sequence may follow). RuntimeError if the token was not
        allowed (cannot happen for masked sampling)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the constraint rejected token {token}: {self.matcher.get_error()}")
        return not self.matcher.is_stopped()

    def take_forced(self, limit):
        """Jump-forward decoding: the tokens the constraint fixes next (at most `limit`), taken as if
        sampled. None are taken when they would complete the constraint: the end stays with the
        sampler (and the end of sequence)."""
        forced = self.matcher.compute_ff_tokens()[: max(0, limit)]
        if not forced:
            return []
        if not self.matcher.consume_tokens(forced):
            raise RuntimeError(f"the constraint rejected its own forced tokens: {self.matcher.get_error()}")
        if self.matcher.is_stopped():
            self.matcher.rollback(len(forced))
            return []
        return forced

    @property
    def accepting(self):
        """Whether what was generated so far is complete under the constraint."""
        return self.matcher.is_accepting()


def _llg_tokenizer(model):
    """llguidance's view of the model's tokenizer (built once per tokenizer: ~1 s for 50k tokens)."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("structured output needs a tokenizer, and this model has none")
    cached = getattr(tokenizer, "_llguidance", None)
    if cached is None:
        from llguidance import LLTokenizer

        eos = list(model.eos_token_ids) or None
        backend = tokenizer._backend
        if hasattr(backend, "_tokenizer"):  # tokenizers (tokenizer.json)
            cached = LLTokenizer(backend._tokenizer.to_str(), n_vocab=model.vocab_size, eos_token=eos)
        else:
            cached = LLTokenizer(_SentencePieceVocabulary(backend._sp, eos).wrapper, n_vocab=model.vocab_size, eos_token=eos)
        tokenizer._llguidance = cached
    return cached


class _SentencePieceVocabulary:
    """A sentencepiece model as llguidance's TokenizerWrapper expects it: every token's bytes, the
    special tokens, and an encoder."""

    def __init__(self, sp, eos_ids):
        import sentencepiece
        from llguidance import TokenizerWrapper
        from sentencepiece import sentencepiece_model_pb2

        self.sp = sp
        # llguidance tokenizes pieces of text in the middle of an output: without sentencepiece's
        # dummy prefix (the "▁" it puts before a text's first word).
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(sp.serialized_model_proto())
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False  # text is tokenized exactly as given
        self.sp_inner = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.eos_token_id = eos_ids[0] if eos_ids else sp.eos_id()
        self.bos_token_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.special_token_ids = [i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
        self.tokens = [self._bytes(i) for i in range(sp.get_piece_size())]
        self.wrapper = TokenizerWrapper(self)

    def _bytes(self, i):
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):  # <0xAB>
            return bytes([int(piece[3:5], 16)])
        if self.sp.is_control(i) or self.sp.is_unknown(i):
            return piece.encode("utf-8")
        return piece.replace("\u2581", " ").encode("utf-8")

    def __call__(self, text):
        return list(self.sp_inner.encode(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text))
