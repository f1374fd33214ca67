"""JSON-schema constrained decoding with llguidance, portable to CPU.

mlx-vlm's own `structured.py` applies the token mask with a Metal kernel, which raises
"No Metal back-end" on Linux. Here the mask is unpacked with numpy and applied with `mx.where`,
which runs on every MLX backend; the cost is a vocab-sized boolean per token (~0.1 ms).
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.hf
import llguidance.numpy
import mlx.core as mx
import numpy as np

# One fixed layout: a real model sees the same spacing it was trained on (", " / ": "), and a
# random one cannot burn its token budget on free-form whitespace.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class SchemaConstraint:
    """The llguidance view of one tokenizer (slow to build: ~1.5 s for 150k tokens), built once per model."""

    def __init__(self, hf_tokenizer: Any, model_vocab_size: int) -> None:
        self.tokenizer_size = len(hf_tokenizer)
        self.vocab_size = max(model_vocab_size, self.tokenizer_size)
        self.eos_token_id = hf_tokenizer.eos_token_id
        self.ll_tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=self.vocab_size)
        self._grammars: dict[str, str] = {}

    def grammar(self, schema: dict[str, Any]) -> str:
        key = json.dumps(schema, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is None:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
            if is_error:
                raise ValueError(f"llguidance cannot compile the schema: {'; '.join(messages)}")
            self._grammars[key] = grammar
        return grammar

    def logits_processor(self, schema: dict[str, Any]) -> "SchemaLogitsProcessor":
        """A fresh processor (own matcher state) for one generation."""
        return SchemaLogitsProcessor(self, self.grammar(schema))


class TokenMask:
    """The tokens a matcher allows next, as a boolean vector over the model's `n_logits` logits."""

    def __init__(self, constraint: SchemaConstraint, n_logits: int) -> None:
        self.c = constraint
        self.n = n_logits
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, constraint.vocab_size)

    def allowed(self, matcher: llguidance.LLMatcher) -> np.ndarray:
        llguidance.numpy.fill_next_token_bitmask(matcher, self.bitmask, 0)
        n = min(self.n, self.c.tokenizer_size)  # ids past the tokenizer cannot be decoded
        bits = np.unpackbits(self.bitmask.view(np.uint8), count=n, bitorder="little").view(bool)  # 0/1 bytes
        allowed = np.zeros(self.n, dtype=bool)
        allowed[:n] = bits
        return allowed


class SchemaLogitsProcessor:
    """`processor(tokens, logits) -> logits` in the form mlx-vlm's `generate_step` calls it.

    The first call sees the prompt; each later call sees the previously sampled token last in
    `tokens`. generate_step computes one step ahead, so after EOS has been sampled the processor is
    called once more with EOS; that step's output is discarded, so a stopped matcher just forces EOS.
    """

    def __init__(self, constraint: SchemaConstraint, grammar: str) -> None:
        self._c = constraint
        # log_level=0: errors surface as exceptions below instead of stderr noise.
        self.matcher = llguidance.LLMatcher(constraint.ll_tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"llguidance grammar error: {self.matcher.get_error()}")
        self._mask: TokenMask | None = None
        self._started = False
        self.free = 0  # steps where the schema left the model a choice (the rest were forced)

    @property
    def done(self) -> bool:
        """True once the JSON value is complete (only EOS may follow)."""
        return self.matcher.is_accepting()

    def _allowed(self, n_logits: int) -> np.ndarray:
        if self.matcher.is_stopped():
            allowed = np.zeros(n_logits, dtype=bool)
            allowed[self._c.eos_token_id] = True
            return allowed
        if self._mask is None or self._mask.n != n_logits:
            self._mask = TokenMask(self._c, n_logits)
        return self._mask.allowed(self.matcher)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._started:
            token = int(tokens[-1].item())
            if not self.matcher.is_stopped() and not self.matcher.consume_token(token):
                raise RuntimeError(f"constrained decoding went off the grammar at token {token}: "
                                   f"{self.matcher.get_error()}")
        self._started = True
        allowed = self._allowed(logits.shape[-1])
        n_allowed = int(np.count_nonzero(allowed))
        if not n_allowed:
            raise RuntimeError(f"constrained decoding reached a dead end: {self.matcher.get_error()}")
        self.free += n_allowed > 1
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))
