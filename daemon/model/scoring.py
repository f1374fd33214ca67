"""Read a report's scores as expectations over the score tokens, rather than as the sampled integers.

As Q-Align does, each score is the probability-weighted expectation over the digits the schema allows at
that point: this is smooth, and it rewards a model that is nearly right. The report is fed back (teacher
forcing) to read the distribution of each score's first digit; since "10" is written "1" then "0", a second
pass with every score written "1" reads P("0" | "1"), which splits the "1" mass between 1 and 10.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from ..analysis.critique import DIMENSIONS

SCORE_VALUE = re.compile(r'"score": (\d+)')


class ScoreReader:
    """Expected scores from one runtime (anything with `model`, `processor`, `tokenizer` and `format_prompt`).

    Call it from the thread that owns the model, with the adapter to read already in place
    (`ModelRuntime.expected_scores` does both)."""

    def __init__(self, runtime: Any) -> None:
        self.rt = runtime
        tok = runtime.tokenizer
        self.digits: list[int] = []
        for d in range(10):
            ids = tok.encode(str(d), add_special_tokens=False)
            if len(ids) != 1:
                raise RuntimeError(f"the tokenizer splits the digit {d} into {len(ids)} tokens")
            self.digits.append(ids[0])
        vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
        # tokens that can follow a finished score: the closing brace, alone or merged with what follows
        self.closers = sorted({i for t, i in vocab.items() if tok.convert_tokens_to_string([t]).startswith("}")})

    def _logits(self, image: Any, prompt_text: str, completion: str) -> tuple[np.ndarray, int, Any]:
        import mlx.core as mx
        from mlx_vlm.utils import prepare_inputs

        inputs = prepare_inputs(self.rt.processor, images=[image], prompts=[prompt_text])
        enc = self.rt.tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
        comp_ids = mx.array([enc["input_ids"]], dtype=inputs["input_ids"].dtype)
        ids = mx.concatenate([inputs["input_ids"], comp_ids], axis=1)
        mask = mx.ones(ids.shape, dtype=mx.int32)
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
        out = self.rt.model(ids, inputs.get("pixel_values"), mask, **extra)
        logits = getattr(out, "logits", out)[0].astype(mx.float32)
        mx.eval(logits)
        return np.array(logits), int(inputs["input_ids"].shape[1]), enc["offset_mapping"]

    @staticmethod
    def _token_at(offsets: Sequence[tuple[int, int]], char: int) -> int:
        for i, (start, end) in enumerate(offsets):
            if start == char and end > start:
                return i
        raise RuntimeError(f"no token starts at character {char} of the report")

    @staticmethod
    def _softmax(row: np.ndarray, ids: Sequence[int]) -> np.ndarray:
        x = row[list(ids)].astype(np.float64)
        x = np.exp(x - x.max())
        return x / x.sum()

    def expected(self, image: Any, prompt: str, text: str,
                 names: Sequence[str] = DIMENSIONS) -> dict[str, float]:
        """E[score] for each of the first len(names) scores of the report `text` the model wrote for (image, prompt).

        `names` label the scores in the order the report holds them (the critique schema's dimensions)."""
        prompt_text = self.rt.format_prompt(prompt)
        matches = list(SCORE_VALUE.finditer(text))
        if len(matches) < len(names):
            raise RuntimeError(f"the report has {len(matches)} scores, expected {len(names)}")
        matches = matches[:len(names)]  # schema order: the dimensions come first
        logits, p_len, offsets = self._logits(image, prompt_text, text)
        first = []
        for m in matches:
            t = self._token_at(offsets, m.start(1))
            first.append(self._softmax(logits[p_len + t - 1], self.digits))  # row before the digit predicts it
        # P("0" | "1"): rewrite every score as "1" and read what the model expects after that "1".
        ones = SCORE_VALUE.sub('"score": 1', text)
        q = [0.0] * len(matches)
        if any(p[1] > 1e-4 for p in first):
            logits1, p_len1, offsets1 = self._logits(image, prompt_text, ones)
            for k, m in enumerate(list(SCORE_VALUE.finditer(ones))[:len(names)]):
                t = self._token_at(offsets1, m.start(1))
                row = logits1[p_len1 + t]
                dist = self._softmax(row, [self.digits[0], *self.closers])
                q[k] = float(dist[0])
        out = {}
        for name, p, qk in zip(names, first, q):
            e = sum(d * float(p[d]) for d in range(10) if d != 1) + float(p[1]) * (1.0 * (1 - qk) + 10.0 * qk)
            out[name] = round(e, 4)
        return out
