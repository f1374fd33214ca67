"""Several photos in one forward pass: batched prefill and greedy decode, one schema constraint per row.

At batch 1 a decode step is launch-bound (issue 11: ~13 ms a pass on the H200 where reading the weights takes
~2 ms), so a deep inbox is served faster by running B photos through each pass. The reports must stay the ones
batch 1 writes, token for token, so this follows `reuse.generate` closely:

- Each photo goes through the vision tower alone (`encode_photo`, as at batch 1; or not at all when the request
  brings it encoded, as rag's two passes do), and its prompt is embedded alone; only the language model runs
  batched. Each pass prefills its whole prompt: an encoded photo's KV cache is neither read nor kept.
- Rows are grouped by prompt length, never padded: photos of one shoot share a size, hence the same number of
  image tokens and the same prompt (a portrait and a landscape of one camera too: h*w is the same). Without
  padding there is no attention mask to get wrong and no masked positions in any reduction; each row keeps its
  own mRoPE positions (`get_rope_index` of its own grid) and its own rope delta while decoding. Left padding
  would batch photos of different sizes too, at the cost of masked softmax terms batch 1 never computes.
- Each row has its own llguidance matcher and walks the same token sequence as batch 1: it consumes the token
  chosen from its own allowed set, then the schema-forced tokens `compute_ff_tokens` gives. In a batch every
  row feeds one token a step (a row with forced tokens queued feeds the next of them, with no choice to make),
  so KV lengths stay equal across rows; fast-forwarding a row several tokens would make the lengths ragged.
- The transformer runs batched (on a GPU, while the rows share one text position, through the flat one-token pass
  of flat_step.py, as batch 1 does); the vocabulary projection runs per row, as batch 1 runs it (`reuse._Head`: the
  last position only, onto the allowed tokens' rows where they are few). A matmul's rows are not bitwise
  independent of its other rows (OpenBLAS differs in the last bits with M), and where logits tie exactly (the
  smoke model gives all ten digits one row) a batched projection picked other scores than batch 1.
- The chosen tokens go into the next pass before their values reach the CPU (as `reuse.generate` overlaps), so
  the device computes the step while llguidance consumes them.
- A row that finishes, fails (max_tokens, a dead end of the schema) or passes its own deadline leaves the batch:
  its KV-cache rows are sliced away so it costs nothing more, and its outcome is its own.

Call from the runtime's thread, under its lock (`ModelRuntime.generate_json_batch`).
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import llguidance
import mlx.core as mx
import numpy as np

from ..limits import check as check_limits, share_time
from .constrained import TokenMask
from .flat_step import FlatStep
from .fused_proj import fused_decoding
from .protocol import BatchRequest
from .reuse import ReuseOutput, _Head, _inputs, encode_photo
from .text_rope import text_positions


@dataclass
class _Row:
    index: int  # position in the caller's list
    request: BatchRequest
    ids: list[int]  # prompt token ids
    embeds: Any  # [1, L, D]
    positions: Any  # [3, 1, L]
    rope_delta: int
    matcher: Any = None
    mask: Any = None
    allowed: np.ndarray | None = None
    out: list[int] = field(default_factory=list)
    pending: deque = field(default_factory=deque)  # tokens of `out` the KV cache does not hold yet
    passes: int = 0
    free: int = 0
    finished: bool = False


class _Stop(Exception):
    """A row leaves the batch (`finished` says whether its JSON closed)."""


def _is_done(row: _Row, eos: int) -> bool:
    a = row.allowed
    return row.matcher.is_stopped() or (row.matcher.is_accepting() and a.sum() == 1 and bool(a[eos]))


def _ready(row: _Row, eos: int) -> bool:
    """Batch 1's checks before a choice: raises _Stop when the row is over; True if the choice needs the model."""
    if _is_done(row, eos):
        row.finished = True
        raise _Stop
    if len(row.out) >= row.request.max_tokens:
        raise _Stop
    if not row.allowed.any():
        raise RuntimeError(f"constrained decoding reached a dead end: {row.matcher.get_error()}")
    return int(np.count_nonzero(row.allowed)) > 1


def _advance(row: _Row, token: int, eos: int, fed: bool) -> None:
    """Consume `token` and the tokens the schema forces after it, as `reuse.generate` does; `fed`: the KV cache
    already holds `token` (it went into this step's pass)."""
    if token == eos:
        row.finished = row.matcher.is_accepting()
        raise _Stop
    if not row.matcher.consume_token(token):
        raise RuntimeError(f"constrained decoding went off the grammar at token {token}: {row.matcher.get_error()}")
    new = [token]
    forced = list(row.matcher.compute_ff_tokens())
    if forced:
        if not row.matcher.consume_tokens(forced):
            raise RuntimeError(f"llguidance rejected its own forced tokens: {row.matcher.get_error()}")
        new += forced
    row.out += new
    row.pending.extend(new[1:] if fed else new)
    row.allowed = row.mask.allowed(row.matcher)
    if _is_done(row, eos):
        row.finished = True
        raise _Stop
    if len(row.out) >= row.request.max_tokens:
        raise _Stop


def _prepare(model: Any, processor: Any, request: BatchRequest, index: int, text_prompt: str,
             encode_prompt: str) -> _Row:
    photo = request.encoded
    if photo is None or photo.features is None:
        image = request.image if request.image.mode == "RGB" else request.image.convert("RGB")
        photo = encode_photo(model, processor, image, encode_prompt)
    inputs = _inputs(processor, model, photo.image, text_prompt)
    input_ids = inputs["input_ids"]
    emb = model.get_input_embeddings(input_ids, inputs["pixel_values"], mask=inputs.get("attention_mask"),
                                     image_grid_thw=inputs.get("image_grid_thw"),
                                     cached_image_features=photo.features)
    return _Row(index=index, request=request, ids=[int(t) for t in input_ids[0].tolist()],
                embeds=emb.inputs_embeds, positions=emb.position_ids,
                rope_delta=int(emb.rope_deltas.reshape(-1)[0].item()))


def generate_batch(model: Any, processor: Any, constraint: Any, requests: list[BatchRequest],
                   text_prompts: list[str], encode_prompt: str) -> list[tuple[ReuseOutput, float] | Exception]:
    """Greedy, schema-constrained generation of every request; each entry is its row's output and the seconds
    from the start of its group's pass to the row's end, or the row's own error."""
    results: list[tuple[ReuseOutput, float] | Exception | None] = [None] * len(requests)
    groups: dict[int, list[_Row]] = {}
    # Each photo is charged the time spent on it alone (its vision tower) and its share of the passes it is in; not
    # the time it waits for the others.
    share_time((r.deadline for r in requests), 0)
    for i, (request, text_prompt) in enumerate(zip(requests, text_prompts)):
        share_time([request.deadline], 1)
        try:
            check_limits(request.cancel, request.deadline)
            row = _prepare(model, processor, request, i, text_prompt, encode_prompt)
        except Exception as exc:  # this photo's own failure (refused by the processor, its deadline)
            results[i] = exc
            continue
        finally:
            share_time([request.deadline], 0)
        groups.setdefault(len(row.ids), []).append(row)
    decode = processor.tokenizer.decode if hasattr(processor, "tokenizer") else processor.decode
    try:
        for rows in groups.values():
            _decode_group(model, constraint, rows, results, decode)
    finally:
        share_time((r.deadline for r in requests), len(requests))  # what follows is for all of them again
    return results  # type: ignore[return-value]


def _decode_group(model: Any, constraint: Any, rows: list[_Row], results: list, decode: Callable) -> None:
    from mlx_vlm.models import cache as mlx_cache

    lm = model.language_model
    eos = constraint.eos_token_id
    started = time.perf_counter()
    head = _Head(lm)
    kv = mlx_cache.make_prompt_cache(lm)

    def leave(row: _Row, error: Exception | None = None) -> None:
        share_time([row.request.deadline], 0)
        text = decode(row.out, skip_special_tokens=False)
        results[row.index] = error if error is not None else (ReuseOutput(
            ids=list(row.out), text=text, prompt_tokens=len(row.ids), reused_tokens=0, forward_passes=row.passes,
            finished=row.finished, free_tokens=row.free), time.perf_counter() - started)

    active: list[_Row] = []
    for row in rows:
        try:
            row.matcher = llguidance.LLMatcher(constraint.ll_tokenizer, constraint.grammar(row.request.schema),
                                               log_level=0)
            if row.matcher.is_error():
                raise ValueError(f"llguidance grammar error: {row.matcher.get_error()}")
            row.mask = TokenMask(constraint, int(lm.args.vocab_size))
            row.allowed = row.mask.allowed(row.matcher)
            active.append(row)
        except Exception as exc:
            leave(row, exc)
    if not active:
        return
    share_time([r.request.deadline for r in active], len(active))
    ids = mx.array([r.ids for r in active])
    hidden = lm.model(ids, inputs_embeds=mx.concatenate([r.embeds for r in active], axis=0), cache=kv,
                      position_ids=mx.concatenate([r.positions for r in active], axis=1))[:, -1, :]

    with fused_decoding(lm):  # decided once for the group: checking each pass costs a step's time on a GPU
        flat = FlatStep.build(lm)  # where it fits (flat_step.py: a GPU, no adapter); mlx-vlm's modules otherwise
        while active:
            # Who is still in, and what each feeds this step: a forced token already known, or one to choose.
            keep: list[int] = []
            choosers: list[int] = []
            for i, row in enumerate(active):
                try:
                    check_limits(row.request.cancel, row.request.deadline)
                    while not row.pending:  # its KV cache holds all it wrote: choose the next token
                        if _ready(row, eos):
                            choosers.append(len(keep))
                            break
                        _advance(row, int(np.flatnonzero(row.allowed)[0]), eos, fed=False)
                except _Stop:
                    leave(row)
                    continue
                except Exception as exc:
                    leave(row, exc)
                    continue
                keep.append(i)
            if len(keep) < len(active):
                index = mx.array(keep, dtype=mx.int32)
                hidden = hidden[index]
                for c in kv:
                    c.keys, c.values = c.keys[index], c.values[index]
                active = [active[i] for i in keep]
                share_time([r.request.deadline for r in active], len(active))
            if not active:
                break
            known = [row.pending[0] if row.pending else 0 for row in active]
            tokens = mx.array(known, dtype=mx.int32)
            chosen = None
            if choosers:
                for j in choosers:
                    active[j].free += 1
                # Per row, exactly as batch 1 projects (reuse._Head): a matmul's rows depend on its other rows in the
                # last bits (OpenBLAS), and the smoke model's ten digits tie exactly, so one projection over the
                # batch picked other scores than batch 1 did.
                chosen = mx.stack([head.choose(hidden[j].reshape(1, 1, -1), active[j].allowed).reshape(())
                                   for j in choosers])
                # Evaluated apart from the pass below, so reading the picks waits for them, not for the whole pass
                # (reuse.pass_on_pick).
                mx.async_eval(chosen)
                tokens[mx.array(choosers, dtype=mx.int32)] = chosen
            offset = int(kv[0].offset)
            # Rows whose images shifted their positions differently cannot share one RoPE offset (text_rope.py).
            same_shift = len({row.rope_delta for row in active}) == 1
            if flat is not None and same_shift:
                ahead = flat.step(tokens, mx.array(offset + active[0].rope_delta), kv)[:, -1, :]
            else:
                positions = mx.array([[offset + row.rope_delta] for row in active], dtype=mx.int32)
                with text_positions(lm) if same_shift else nullcontext():
                    ahead = lm.model(tokens.reshape(-1, 1), cache=kv,
                                     position_ids=mx.broadcast_to(positions[None], (3, len(active), 1)))[:, -1, :]
            mx.async_eval(ahead)
            picks = [int(t) for t in chosen.tolist()] if chosen is not None else []
            for row in active:
                row.passes += 1
            gone: dict[int, Exception | None] = {}
            for k, j in enumerate(choosers):
                try:
                    _advance(active[j], picks[k], eos, fed=True)
                except _Stop:
                    gone[j] = None
                except Exception as exc:
                    gone[j] = exc
            for j, row in enumerate(active):
                if j not in choosers:
                    row.pending.popleft()
            for j, error in gone.items():
                leave(active[j], error)
            hidden = ahead
            if gone:
                keep = [j for j in range(len(active)) if j not in gone]
                if not keep:
                    break
                index = mx.array(keep, dtype=mx.int32)
                hidden = hidden[index]
                for c in kv:
                    c.keys, c.values = c.keys[index], c.values[index]
                active = [active[j] for j in keep]
                share_time([r.request.deadline for r in active], len(active))  # the rows that finished leave it
