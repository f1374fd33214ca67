"""Encode a photo once; run several schema-constrained prompts on it.

RAG asks two questions of each photo (pass 1: its profile; pass 2: the critique grounded in the portfolio).
Run naively, that is two `mlx_vlm.generate` calls, and each runs the vision tower (most of the prefill at
real Qwen2-VL-2B shapes on a CPU) and prefills the same system prompt, image and advisor prompt again.

Here, as mlx-vlm's own machinery does it:
- the vision features are computed once (`encode_photo`) and handed to the model through mlx-vlm's
  `cached_image_features` hook of `get_input_embeddings` (what its `VisionFeatureCache` feeds);
- the KV cache of the previous prompt is kept with the photo, and the next prompt prefills only the tokens
  after the prefix the two share (`PromptCacheState.find_prefix_length` + `KVCache.trim`, the same way
  mlx-vlm's `stream_generate(prompt_cache_state=...)` reuses a previous turn). The image sits inside that
  prefix, so the second pass never sees the vision tower;
- the mean of the vision features is the photo's embedding for visual similarity, so no second model is
  needed.

The decode loop is our own rather than mlx-vlm's `generate_step`, for one reason: a JSON report is mostly
forced by its schema (keys, quotes, braces). llguidance reports those forced tokens (`compute_ff_tokens`);
they are appended in the same forward pass as the sampled token instead of one decode step each. Greedy
results are those of the one-token-at-a-time loop (a forced token is the only one the mask allows; the
forced text is tokenized canonically). Prefill and decode also compute the vocabulary projection for the
last position only, where mlx-vlm projects every prompt position, and where the schema allows only a few
tokens (a score, a key) only onto those tokens' rows: at Qwen2-VL-2B shapes the full projection is a 0.9 GB
read per step.

On a GPU the one-token passes run through flat_step.py: the same numbers as mlx-vlm's modules, in fewer graph
nodes and less Python a step (a batch-1 step there is host work). On CUDA a free token is picked without the
schema's mask and checked once known (`guessing_pays`): a masked pick costs the host there, and in free text the
unmasked argmax is nearly always allowed; a miss undoes its pass and picks again under the mask.

Only Qwen2-VL checkpoints take this path (`supports(model)`); callers fall back to plain generation.
MLX is not thread-safe: call everything here from the runtime's thread, under its lock.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jsonschema
import llguidance
import mlx.core as mx
import numpy as np

from ..errors import Permanent
from .constrained import TokenMask
from .flat_step import FlatStep
from .fused_proj import fused_decoding
from .text_rope import text_positions

if TYPE_CHECKING:
    from PIL import Image

SUPPORTED_MODEL_TYPES = ("qwen2_vl",)


def supports(model: Any) -> bool:
    config = getattr(model, "config", None)
    lm = getattr(model, "language_model", None)
    return (getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES and hasattr(model, "vision_tower")
            and hasattr(lm, "model") and hasattr(lm, "get_rope_index"))


@dataclass
class EncodedPhoto:
    """A photo after the vision tower: pass it to `ModelRuntime.generate_json(encoded=...)` for each prompt.

    `embedding` is the L2-normalised mean of the projected vision features (float32), or None when the model
    does not take the reuse path. Keep one only for the photo in hand: it holds the KV cache of its last prompt.
    """

    image: "Image.Image"
    embedding: np.ndarray | None
    seconds: float  # time spent in the vision tower
    image_tokens: int = 0
    features: Any = field(default=None, repr=False)  # mx.array [image_tokens, hidden]
    kv: Any = field(default=None, repr=False)  # KV cache of the last prompt run with this photo
    kv_ids: list[int] | None = field(default=None, repr=False)  # the token ids that cache holds
    kv_key: Any = field(default=None, repr=False)  # the LoRA adapter the cache was computed under

    def embedding_bytes(self) -> bytes | None:
        return None if self.embedding is None else self.embedding.astype(np.float32).tobytes()


@dataclass
class ReuseOutput:
    ids: list[int]
    text: str
    prompt_tokens: int
    reused_tokens: int  # prompt tokens served from the previous prompt's KV cache
    forward_passes: int  # decode forward passes (one may append several schema-forced tokens)
    finished: bool  # the JSON value closed before max_tokens
    free_tokens: int = 0  # tokens the model chose among several the schema allowed; the rest were forced


class PhotoRefused(Permanent, ValueError):
    """The model's image preprocessing refuses this photo (its shape or size): the same photo is refused again,
    so the worker fails it at once instead of retrying."""


def _inputs(processor: Any, model: Any, image: "Image.Image", text_prompt: str) -> dict[str, Any]:
    from mlx_vlm.utils import prepare_inputs

    try:
        return prepare_inputs(processor, images=[image], prompts=text_prompt,
                              image_token_index=getattr(model.config, "image_token_index", None))
    except ValueError as exc:  # mlx-vlm wraps the processor's own refusals (aspect ratio, size) in ValueError
        raise PhotoRefused(f"the model's image preprocessing refused the photo ({exc}); export it at a more "
                           f"ordinary size and shape") from exc


def encode_photo(model: Any, processor: Any, image: "Image.Image", text_prompt: str) -> EncodedPhoto:
    """Run the vision tower once. `text_prompt` is any chat-templated prompt holding the image."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if not supports(model):
        return EncodedPhoto(image=image, embedding=None, seconds=0.0)
    started = time.perf_counter()
    inputs = _inputs(processor, model, image, text_prompt)
    dtype = model.vision_tower.patch_embed.proj.weight.dtype
    features = model.vision_tower(inputs["pixel_values"].astype(dtype), inputs["image_grid_thw"],
                                  output_hidden_states=False)
    pooled = mx.mean(features.astype(mx.float32), axis=0)
    mx.eval(features, pooled)
    vec = np.array(pooled, dtype=np.float32)
    norm = float(np.linalg.norm(vec))
    embedding = vec / norm if norm > 0 else vec
    return EncodedPhoto(image=image, embedding=embedding, seconds=time.perf_counter() - started,
                        image_tokens=int(features.shape[0]), features=features)


def guessing_pays() -> bool:
    """Whether the decode loop should pick a free token without the schema's mask and check it afterwards
    (`_Head(guess=True)`): on MLX's CUDA backend a pick masked by a fresh host vector costs up to ~2 ms a step
    more than an unmasked one (bench/RESULTS.md, `decode_step`: `masked_step_ms` against `ours_step_ms`), while
    the unmasked argmax is an allowed token ~98 % of the time in free text and a miss costs one pass. On the CPU
    the mask costs ~0.1 ms and a pass far more: never there."""
    cuda = getattr(mx, "cuda", None)  # an older MLX has no CUDA module at all
    return mx.default_device().type == mx.DeviceType.gpu and cuda is not None and bool(cuda.is_available())


class _Head:
    """The vocabulary projection, applied to the last position only, and where the schema allows few tokens
    (a score, a key), only to those tokens' rows: greedy argmax over the allowed set either way.

    With `guess`, a pick among most of the vocabulary (free text) is the unmasked argmax, and `guessed` says the
    caller must check the token against the mask once its value is known, and on a miss undo the pass it queued
    and pick again with `masked`. Exact: argmax returns the first maximum, so an allowed unmasked argmax is the
    first maximum among the allowed tokens too."""

    SUBSET_FRACTION = 4  # project onto a subset when it is at most 1/4 of the vocabulary
    UNIFORM_ROWS = 64  # up to this many rows (a score's digits, a key): no BLAS, one reduction per row
    GUESS_FRACTION = 2  # guess only where more than half the vocabulary is allowed (free text: ~98 % hits)

    def __init__(self, lm: Any, *, guess: bool = False) -> None:
        import mlx.nn as nn

        self.lm = lm
        self.free = 0  # picks among more than one allowed token
        self.guess = guess
        self.guessed = False  # the last `choose` returned an unmasked argmax, not yet checked
        self.guesses = 0
        self.misses = 0  # guesses the schema did not allow
        self.tied = bool(lm.args.tie_word_embeddings)
        module = lm.model.embed_tokens if self.tied else lm.lm_head
        plain = type(module) in ((nn.Embedding,) if self.tied else (nn.Linear,))  # not quantized
        self.weight = module.weight if plain else None
        self.bias = None if self.tied else getattr(module, "bias", None)

    def full(self, last: mx.array) -> mx.array:
        if self.tied:
            return self.lm.model.embed_tokens.as_linear(last)[0, -1]
        return self.lm.lm_head(last)[0, -1]

    def choose(self, hidden: mx.array, allowed: np.ndarray) -> "int | mx.array":
        """The greedy token: an int where the schema allows only one, else a lazy scalar (not yet computed)."""
        n = int(np.count_nonzero(allowed))  # a tenth of flatnonzero's time over the real vocabulary
        self.guessed = False
        if n == 1:
            return int(allowed.argmax())
        self.free += 1
        if self.guess and n * self.GUESS_FRACTION > allowed.size:
            self.guessed = True
            self.guesses += 1
            return mx.argmax(self.full(hidden[:, -1:, :])).astype(mx.int32)
        last = hidden[:, -1:, :]
        if self.weight is not None and n * self.SUBSET_FRACTION <= allowed.size:
            idx = np.flatnonzero(allowed)
            rows = mx.array(idx.astype(np.int32))
            if len(idx) <= self.UNIFORM_ROWS:
                # Each row reduced by the same code, so equal rows give bitwise equal logits whatever the hidden
                # state's last bits: a BLAS matrix-vector product computes rows in blocks, and where logits tie
                # (the smoke model gives all ten digits one row) which digit won depended on how the transformer
                # before it was batched.
                logits = (self.weight[rows] * last.reshape(1, -1)).sum(axis=-1)
            else:
                logits = self.weight[rows] @ last.reshape(-1)
            if self.bias is not None:
                logits = logits + self.bias[rows]
            return rows[mx.argmax(logits)]
        return self.masked(hidden, allowed)

    def masked(self, hidden: mx.array, allowed: np.ndarray) -> mx.array:
        """The greedy token among `allowed` over the whole vocabulary, lazy (a guess's second try: not counted
        again as a free pick)."""
        self.guessed = False
        logits = self.full(hidden[:, -1:, :])
        masked = mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))
        return mx.argmax(masked).astype(mx.int32)


def pass_on_pick(head: _Head, chosen: mx.array, hidden: mx.array, allowed: np.ndarray, forward: Any,
                 kv: list) -> tuple[int, mx.array, int]:
    """Queue the one-token pass on `chosen` (`head.choose`'s lazy pick after `hidden`) before its value reaches the
    CPU, so the device computes it while llguidance consumes the token and builds the next mask; then read the
    token. A guess the schema does not allow has its pass undone (the cache trimmed back) and is picked again
    under the mask. (token, the queued pass's hidden state, passes run).

    The pick is evaluated on its own, before the pass is built: MLX gives every array of one `async_eval` a single
    event, signalled when all of it is done, so a pick evaluated with its pass could only be read after the whole
    pass, and the host would build the next pass while the device sat idle instead of while it runs this one."""
    mx.async_eval(chosen)
    ahead = forward(chosen.reshape(1, 1))
    mx.async_eval(ahead)
    token = int(chosen.item())
    if not head.guessed or allowed[token]:
        return token, ahead, 1
    head.misses += 1
    for c in kv:
        c.trim(1)
    chosen = head.masked(hidden, allowed)
    mx.async_eval(chosen)
    ahead = forward(chosen.reshape(1, 1))
    mx.async_eval(ahead)
    return int(chosen.item()), ahead, 2


GUESS: bool | None = None  # None: `guessing_pays()`; a benchmark or a test sets it to compare both ways


def guesses(lm: Any) -> tuple[int, int]:
    """(unmasked guesses, of which missed) over every critique `lm` has written (a test or a benchmark reads it)."""
    return lm.__dict__.get("_guesses", (0, 0))


def _positions(offset: int, rope_deltas: mx.array, n: int) -> mx.array:
    # Text after the prompt: all three mRoPE axes advance together from the prompt's end.
    p = mx.arange(n).reshape(1, -1) + offset + rope_deltas.reshape(-1)[:1].reshape(1, 1)
    return mx.broadcast_to(p[None], (3, 1, n))


def generate(model: Any, processor: Any, constraint: Any, photo: EncodedPhoto, text_prompt: str,
             schema: dict, *, max_tokens: int, check: Any = None) -> ReuseOutput:
    """Greedy, schema-constrained generation on an encoded photo, reusing its previous prompt's KV cache.

    `check()`, if given, runs before every forward pass and may raise to end the generation (stop, time limit).
    """
    from mlx_vlm.models import cache as mlx_cache

    lm = model.language_model
    inputs = _inputs(processor, model, photo.image, text_prompt)
    input_ids = inputs["input_ids"]
    ids = [int(t) for t in input_ids[0].tolist()]

    # The longest prefix shared with the previous prompt (system prompt, image, advisor prompt, ...).
    reused = 0
    kv = photo.kv
    if kv is not None and photo.kv_ids:
        limit = min(len(ids) - 1, len(photo.kv_ids), int(kv[0].offset))  # keep >= 1 token to prefill
        while reused < limit and ids[reused] == photo.kv_ids[reused]:
            reused += 1
        if reused and all(c.is_trimmable() for c in kv):
            for c in kv:
                c.trim(int(c.offset) - reused)
        else:
            reused = 0
    if reused == 0:
        kv = mlx_cache.make_prompt_cache(lm)
    photo.kv, photo.kv_ids = None, None  # until this prompt is in the cache, the old state is gone

    emb = model.get_input_embeddings(input_ids, inputs["pixel_values"], mask=inputs.get("attention_mask"),
                                     image_grid_thw=inputs.get("image_grid_thw"),
                                     cached_image_features=photo.features)
    position_ids, rope_deltas = emb.position_ids, emb.rope_deltas
    hidden = lm.model(input_ids[:, reused:], inputs_embeds=emb.inputs_embeds[:, reused:], cache=kv,
                      position_ids=position_ids[..., reused:])
    # Guessing undoes a missed pass by trimming the cache: only where every layer's cache can be trimmed.
    head = _Head(lm, guess=(GUESS if GUESS is not None else guessing_pays()) and all(c.is_trimmable() for c in kv))
    flat: FlatStep | None = None  # made inside the block below, where the stacked projections are settled
    delta = 0

    def forward(tokens: mx.array) -> mx.array:  # tokens after the prompt, run inside the block below
        if flat is not None:
            return flat.step(tokens, mx.array(int(kv[0].offset) + delta), kv)
        return lm.model(tokens, cache=kv, position_ids=_positions(int(kv[0].offset), rope_deltas,
                                                                  int(tokens.shape[1])))

    matcher = llguidance.LLMatcher(constraint.ll_tokenizer, constraint.grammar(schema), log_level=0)
    if matcher.is_error():
        raise ValueError(f"llguidance grammar error: {matcher.get_error()}")
    mask = TokenMask(constraint, int(lm.args.vocab_size))
    eos = constraint.eos_token_id
    out: list[int] = []
    passes = 0
    finished = False
    allowed = mask.allowed(matcher)
    # Every pass below is on text positions (text_rope) and may project through stacked weights (fused_proj):
    # entered once a generation, as checking each pass costs a step's time on a GPU.
    with text_positions(lm), fused_decoding(lm):
        flat = FlatStep.build(lm)  # where it fits (flat_step.py: a GPU, no adapter); mlx-vlm's modules otherwise
        if flat is not None:
            delta = int(rope_deltas.reshape(-1)[0].item())
        while True:
            if matcher.is_stopped() or (matcher.is_accepting() and allowed.sum() == 1 and allowed[eos]):
                finished = True
                break
            if len(out) >= max_tokens:
                break
            if not allowed.any():
                raise RuntimeError(f"constrained decoding reached a dead end: {matcher.get_error()}")
            chosen = head.choose(hidden, allowed)
            ahead = None
            if isinstance(chosen, int):  # the schema allows one token: known without the model
                token = chosen
            else:
                # The next pass is queued on the token before its value is known: right unless the schema forces
                # tokens after it (then they get a pass of their own); a stop wastes one pass.
                if check is not None:
                    check()
                token, ahead, ran = pass_on_pick(head, chosen, hidden, allowed, forward, kv)
                passes += ran
            if token == eos:
                finished = matcher.is_accepting()
                break
            if not matcher.consume_token(token):
                raise RuntimeError(f"constrained decoding went off the grammar at token {token}: "
                                   f"{matcher.get_error()}")
            new = [token]
            forced = list(matcher.compute_ff_tokens())
            if forced:
                if not matcher.consume_tokens(forced):
                    raise RuntimeError(f"llguidance rejected its own forced tokens: {matcher.get_error()}")
                new += forced
            out += new
            allowed = mask.allowed(matcher)
            if matcher.is_stopped() or (matcher.is_accepting() and allowed.sum() == 1 and allowed[eos]):
                finished = True
                break  # nothing left to sample: no need to run the model on the last tokens
            if len(out) >= max_tokens:
                break
            todo = new if ahead is None else forced  # what the cache does not hold yet
            if not todo:
                hidden = ahead
                continue
            if check is not None:
                check()
            hidden = forward(mx.array([todo]))
            passes += 1
    mx.eval([c.state for c in kv])
    total, missed = guesses(lm)
    object.__setattr__(lm, "_guesses", (total + head.guesses, missed + head.misses))
    photo.kv, photo.kv_ids = kv, ids
    text = processor.tokenizer.decode(out, skip_special_tokens=False) if hasattr(processor, "tokenizer") \
        else processor.decode(out, skip_special_tokens=False)
    return ReuseOutput(ids=out, text=text, prompt_tokens=len(ids), reused_tokens=reused,
                       forward_passes=passes, finished=finished, free_tokens=head.free)


_VALIDATORS: dict[str, Any] = {}


def parse(text: str, schema: dict) -> dict:
    """The decoded JSON, checked against `schema` (ValueError / jsonschema.ValidationError otherwise).

    `jsonschema.validate` checks the schema itself and builds a validator on every call (~7 ms a critique); the
    few schemas Mondrian decodes against are checked once and their validators kept."""
    data = json.loads(text)
    key = json.dumps(schema, sort_keys=True)
    validator = _VALIDATORS.get(key)
    if validator is None:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        validator = _VALIDATORS.setdefault(key, cls(schema))
    validator.validate(data)
    return data
