"""Mutation audit of the model fast path (daemon/model/): each test here kills a deliberate bug that the other tests
let through (the bug each one kills is named in its docstring). Real MLX, real mlx-vlm, real llguidance and the tiny
smoke checkpoints; no mocks. References are mlx-vlm's own forward pass or load, batch 1, or a fresh photo.

Why the equivalence tests missed the KV-cache bug: on the context-sensitive random model a decode step attends over
dozens to hundreds of prompt positions, most of them image tokens, so a dozen wrong prompt tokens in the KV cache move
the logits too little to flip a greedy pick under the schema; comparing the cache itself with mlx-vlm's prefill does
not depend on that.
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daemon.analysis.critique import DIMENSIONS, critique_schema, profile_schema
from daemon.model.runtime import ModelRuntime

MAX_PIXELS = 112 * 112
P1 = "You judge prints.\n\nScore the photograph."  # rag's two passes: a shared prefix, then different words
P2 = "You judge prints.\n\nCritique it, one line each."


def _photo(size: tuple[int, int] = (112, 112)) -> Image.Image:
    return Image.open(Path(__file__).resolve().parent.parent / "samples" / "astronaut.jpg").convert("RGB").resize(size)


@pytest.fixture(scope="module")
def plain_rt(plain_model_path: Path) -> ModelRuntime:
    return ModelRuntime.load(str(plain_model_path), var_dir=plain_model_path.parent, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def smoke_rt(smoke_model_path: Path) -> ModelRuntime:
    return ModelRuntime.load(str(smoke_model_path), var_dir=smoke_model_path.parent, max_pixels=MAX_PIXELS)


def _mlx_vlm_prefill(rt: ModelRuntime, image: Image.Image, prompt: str, after: list[int]) -> list:
    """mlx-vlm's own forward pass over the prompt (image included) and the tokens `after` it, into a fresh KV cache."""
    import mlx.core as mx
    from mlx_vlm.models import cache as mlx_cache
    from mlx_vlm.utils import prepare_inputs

    inputs = prepare_inputs(rt.processor, images=[image], prompts=[rt.format_prompt(prompt)])
    ids = mx.concatenate([inputs["input_ids"], mx.array([after], dtype=inputs["input_ids"].dtype)], axis=1)
    kv = mlx_cache.make_prompt_cache(rt.model.language_model)
    rt.model(ids, inputs["pixel_values"], mx.ones(ids.shape, dtype=mx.int32), cache=kv,
             image_grid_thw=inputs["image_grid_thw"])
    mx.eval([c.state for c in kv])
    return kv


def _assert_same_cache(ours: list, theirs: list, what: str) -> None:
    for layer, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert int(a.offset) == int(b.offset), f"{what}: layer {layer} holds {a.offset} positions, not {b.offset}"
        for name, x, y in zip(("keys", "values"), a.state, b.state):
            x, y = np.array(x), np.array(y)
            err = np.abs(x - y).max(axis=(0, 1, 3))  # per position
            bad = np.flatnonzero(err > 1e-4 * max(1.0, float(np.abs(y).max())))
            assert not len(bad), f"{what}: layer {layer} {name} differ from mlx-vlm's at positions {bad[:8].tolist()}" \
                                 f"{'...' if len(bad) > 8 else ''} (max {err.max():.3g})"


# -- reuse.py: the prefix shared with the previous prompt ----------------------------------------------------------
def test_the_kv_cache_of_a_reused_prefix_holds_exactly_what_mlx_vlm_prefills(plain_rt: ModelRuntime) -> None:
    """rag's pass 2 on pass 1's KV cache: after each pass the cache holds, position for position, what mlx-vlm's own
    forward pass computes for that prompt and the generated tokens the cache holds (every one but those after the
    last pass). Kills: reusing cached positions past the prefix the two prompts share (reuse.py, the prefix loop),
    a cache trimmed to the wrong length, generated or forced tokens missing from it, wrong positions for them."""
    from daemon.model import reuse

    rt = plain_rt
    image = _photo()
    enc = rt.encode(image)
    first = reuse.generate(rt.model, rt.processor, rt.constraint, enc, rt.format_prompt(P1), profile_schema(),
                           max_tokens=256)
    held = int(enc.kv[0].offset) - first.prompt_tokens
    assert first.finished and first.reused_tokens == 0 and 0 < held <= len(first.ids)
    _assert_same_cache(enc.kv, _mlx_vlm_prefill(rt, image, P1, first.ids[:held]), "pass 1")

    second = reuse.generate(rt.model, rt.processor, rt.constraint, enc, rt.format_prompt(P2), critique_schema(24),
                            max_tokens=1400)
    assert second.finished and enc.image_tokens < second.reused_tokens < second.prompt_tokens - 5  # the words differ
    held = int(enc.kv[0].offset) - second.prompt_tokens
    assert 0 < held <= len(second.ids)
    _assert_same_cache(enc.kv, _mlx_vlm_prefill(rt, image, P2, second.ids[:held]), "pass 2 on pass 1's cache")


# -- runtime.py + reuse.py + adapters.py: a cache computed under an adapter ----------------------------------------
def test_an_encoded_photos_cache_from_one_adapter_never_serves_another(plain_rt: ModelRuntime, tmp_path: Path) -> None:
    """One encoded photo, the same prompt with an advisor's adapter, then without, then with again: each text is the
    one a fresh photo gets under that adapter. Kills: reusing the photo's KV cache across adapters (runtime.py,
    `_generate_encoded`'s kv_key check), where the prompt is identical and all but one position would be reused."""
    from tests.lora_helpers import random_adapter

    rt = plain_rt
    adapter = random_adapter(tmp_path / "adapter", rt.model, seed=3)
    image, prompt, schema = _photo(), "Critique this photograph.", critique_schema(24)
    base = rt.generate_json(image, prompt, schema, max_tokens=1400).text
    advised = rt.generate_json(image, prompt, schema, max_tokens=1400, adapter=adapter).text
    assert base != advised
    enc = rt.encode(image)
    assert rt.generate_json(image, prompt, schema, max_tokens=1400, encoded=enc, adapter=adapter).text == advised
    after = rt.generate_json(image, prompt, schema, max_tokens=1400, encoded=enc)
    assert after.text == base, "the base model's report was written on the adapter's KV cache"
    again = rt.generate_json(image, prompt, schema, max_tokens=1400, encoded=enc, adapter=adapter)
    assert again.text == advised, "the adapter's report was written on the base model's KV cache"
    assert rt.generate_json(image, prompt, schema, max_tokens=1400, encoded=enc, adapter=adapter).reused_tokens > 0


# -- constrained.py: the layout a report is written in -------------------------------------------------------------
def test_a_report_is_written_in_the_layout_the_model_is_trained_on(smoke_rt: ModelRuntime) -> None:
    """The constrained decoder's separators (constrained.JSON_OPTIONS) are the ones training targets and the ordinal
    loss's score positions are written in (critique.JSON_LAYOUT via jobs.dataset.report_text): a model trains on
    exactly the tokens it later writes. Kills: another item or key separator, or free whitespace, in JSON_OPTIONS
    (every equivalence test compares with mlx-vlm under the same constraint, so it cannot see the layout)."""
    from daemon.model.scoring import SCORE_VALUE
    from jobs.dataset import report_text

    for size in ((112, 112), (112, 84)):
        gen = smoke_rt.generate_json(_photo(size), "Critique this photograph.", critique_schema(24), max_tokens=1400)
        assert gen.text == report_text(gen.data)
        assert len(SCORE_VALUE.findall(gen.text)) == len(DIMENSIONS)  # what ScoreReader reads the scores by


# -- scoring.py: which logits row predicts a score -----------------------------------------------------------------
def _next_token_probs(rt: ModelRuntime, image: Image.Image, prompt: str, completion: str) -> np.ndarray:
    """P(next token | prompt, completion) from mlx-vlm's forward pass over exactly that text (its last row)."""
    import mlx.core as mx
    from mlx_vlm.utils import prepare_inputs

    inputs = prepare_inputs(rt.processor, images=[image], prompts=[rt.format_prompt(prompt)])
    comp = rt.tokenizer.encode(completion, add_special_tokens=False)
    ids = mx.concatenate([inputs["input_ids"], mx.array([comp], dtype=inputs["input_ids"].dtype)], axis=1)
    out = rt.model(ids, inputs["pixel_values"], mx.ones(ids.shape, dtype=mx.int32),
                   image_grid_thw=inputs["image_grid_thw"])
    logits = np.array(getattr(out, "logits", out)[0, -1].astype(mx.float32), dtype=np.float64)
    p = np.exp(logits - logits.max())
    return p / p.sum()


def test_expected_scores_read_the_distribution_that_predicts_each_score(plain_rt: ModelRuntime) -> None:
    """E[score] per dimension, on a model whose every row differs (`plain_model_path`), against its definition
    computed from mlx-vlm's own forward pass over the text up to each score: P(digit | text before it), with "1"
    split into 1 and 10 by P("0" | text up to a "1") against every token that closes the score ("}", "},", "}},").
    Kills: reading the row at the digit instead of the row before it (the designed model of test_lora gives both rows
    one distribution), and closers cut down to a bare "}" (the designed model gives merged closers no mass)."""
    from daemon.model.scoring import SCORE_VALUE

    rt = plain_rt
    tok = rt.tokenizer
    digits = [tok.encode(str(d), add_special_tokens=False)[0] for d in range(10)]
    closers = [i for t, i in tok.get_vocab().items() if tok.convert_tokens_to_string([t]).startswith("}")]
    assert len(closers) > 1  # merged closers exist in this vocabulary ("},", "}},")
    scores = [3, 10, 7, 0, 5, 9, 1, 6]
    report = {"dimensions": {d: {"comment": "Soft light, open shadows.", "score": s}
                             for d, s in zip(DIMENSIONS, scores)},
              "summary": "A careful, honest portrait.", "overall_grade": 7}
    text = json.dumps(report, separators=(", ", ": "))
    ones = SCORE_VALUE.sub('"score": 1', text)
    image, prompt = _photo((56, 56)), "Critique this photograph."
    want = {}
    for name, m, m1 in zip(DIMENSIONS, SCORE_VALUE.finditer(text), SCORE_VALUE.finditer(ones)):
        p = _next_token_probs(rt, image, prompt, text[:m.start(1)])[digits]
        p = p / p.sum()
        after_one = _next_token_probs(rt, image, prompt, ones[:m1.start(1)] + "1")
        q = after_one[digits[0]] / (after_one[digits[0]] + after_one[closers].sum())
        assert p[1] > 1e-3 and 1e-3 < q < 1 - 1e-3  # both terms matter
        want[name] = sum(d * p[d] for d in range(10) if d != 1) + p[1] * (1 * (1 - q) + 10 * q)
    got = rt.expected_scores(image, prompt, text)
    assert got == {name: pytest.approx(value, abs=2e-3) for name, value in want.items()}


# -- batch.py: a row that leaves between passes --------------------------------------------------------------------
class _StopAfter(threading.Event):
    """A stop request that arrives after `looks` checks: the runtime checks each row once before its prompt is
    prepared, then once a decode step; so it arrives mid-report, at the same step on every run."""

    def __init__(self, looks: int) -> None:
        super().__init__()
        self.looks = looks

    def is_set(self) -> bool:
        self.looks -= 1
        return self.looks < 0 or super().is_set()


PHOTOS_SHAPE, PROMPT, SCHEMA = (84, 112, 3), "Critique this photograph.", critique_schema(24)


def _noise_photos() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 255, PHOTOS_SHAPE, dtype=np.uint8)) for _ in range(3)]


@pytest.fixture(scope="module")
def alone_texts(plain_rt: ModelRuntime) -> list[str]:
    texts = [plain_rt.generate_json(p, PROMPT, SCHEMA, max_tokens=1400).text for p in _noise_photos()]
    assert len(set(texts)) == len(texts)  # the rows are told apart (their texts part in the first comment)
    return texts


# Steps at which the stop lands (counted in checks): on this model the rows after the stopped one choose a free token
# there, and reading the wrong row's hidden state picks another one at each of them (measured; at other steps the
# rows feed forced tokens, or happen to agree).
@pytest.mark.parametrize("looks", [17, 35, 65, 101])
def test_a_row_stopped_mid_report_leaves_the_others_writing_batch_1s_text(plain_rt: ModelRuntime, alone_texts: list,
                                                                          looks: int) -> None:
    """A stop (or a photo's own deadline) that arrives while a batch decodes takes its row out before the next pass;
    the rows after it go on with their own hidden states and KV-cache rows and write what each writes alone. Kills:
    slicing the KV cache but not the last hidden states when a row leaves before a pass (batch.py, `keep`): the
    rows after it then pick their next token from the row before them (test_batch stops rows only before decoding
    starts, where there are no hidden states yet)."""
    from daemon.errors import Cancelled
    from daemon.model.protocol import BatchRequest

    photos = _noise_photos()
    stop = _StopAfter(looks)
    got = plain_rt.generate_json_batch([BatchRequest(photos[0], PROMPT, SCHEMA, 1400, cancel=stop),
                                        *(BatchRequest(p, PROMPT, SCHEMA, 1400) for p in photos[1:])])
    assert isinstance(got[0], Cancelled) and stop.looks < 0
    for i in (1, 2):
        assert not isinstance(got[i], Exception), f"photo {i}: {got[i]!r}"
        assert got[i].text == alone_texts[i], f"photo {i} wrote another text once photo 0 left the batch"


# -- fused_proj.py: an adapter's LoRA layers are not stackable ---------------------------------------------------
def test_an_adapters_lora_layers_never_count_as_a_failed_stacking(plain_model_path: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A decode pass with an advisor's adapter in (LoRA layers in q/k/v and gate/up) runs mlx-vlm's layers without
    trying to stack them: no "stacking failed" warning, and the base weights replaced after it (a reload, a
    quantization) are stacked again on the next pass, with mlx-vlm's numbers. Kills: `Stacked._stackable` accepting
    LoRA layers (fused_proj.py): stacking them then fails, a false warning is logged, and that projection group
    stays on the slow path for good once its weights change."""
    import logging

    import mlx.core as mx
    from mlx_vlm.models import cache as mlx_cache

    from daemon.model import fused_proj
    from daemon.model.fused_proj import fused_calls, fused_decoding, stacks
    from tests.lora_helpers import random_adapter

    rt = ModelRuntime.load(str(plain_model_path), var_dir=plain_model_path.parent, max_pixels=MAX_PIXELS)
    assert fused_proj.install(rt.model, always=True)
    lm = rt.model.language_model
    adapter = random_adapter(tmp_path / "adapter", rt.model, seed=5)

    def last_hidden(fused: bool) -> np.ndarray:
        kv = mlx_cache.make_prompt_cache(lm)
        mx.eval(lm.model(mx.array([[5, 17, 300, 42, 7, 99]]), cache=kv))
        with fused_decoding(lm) if fused else contextlib.nullcontext():
            return np.array(lm.model(mx.array([[64, 65]]), cache=kv)[0, -1])

    last_hidden(fused=True)  # the base: stacked
    stacked = sum(s.stacks for s in stacks(lm))
    assert stacked == 2 * len(lm.layers)
    with caplog.at_level(logging.DEBUG, logger="daemon.model.fused_proj"), rt.use_adapter(adapter):
        calls = fused_calls(lm)
        last_hidden(fused=True)
        assert fused_calls(lm) == calls  # the adapter's layers ran mlx-vlm's code
    assert not [r for r in caplog.records if "stacking failed" in r.getMessage()]
    assert not [s.failed for s in stacks(lm) if s.failed]
    layer = lm.layers[1]
    rt.model.load_weights([("language_model.model.layers.1.self_attn.k_proj.weight", layer.self_attn.k_proj.weight * 3),
                           ("language_model.model.layers.1.mlp.up_proj.weight", layer.mlp.up_proj.weight * -1)],
                          strict=False)
    mx.eval(rt.model.parameters())
    calls = fused_calls(lm)
    fast = last_hidden(fused=True)
    assert sum(s.stacks for s in stacks(lm)) == stacked + 2  # the two replaced groups, stacked again
    assert fused_calls(lm) - calls == 2 * len(lm.layers)  # every layer on the stacked path
    np.testing.assert_allclose(fast, last_hidden(fused=False), rtol=0, atol=1e-4)


# -- adapters.py: an adapter's scale, when only the scale differs from the last one ---------------------------------
def test_going_back_to_an_adapter_after_one_of_another_scale_restores_its_scale(smoke_model_path: Path,
                                                                                tmp_path: Path) -> None:
    """Advisors whose adapters share rank and targets but not their scale, photo after photo (c, d, c, d): each swap
    gives the logits of mlx-vlm's own load of that adapter. Kills: the manager forgetting which scale is in its
    layers after a scale-only swap (adapters.py, `activate`: `self.installed = entry.spec`), so going back to c
    keeps d's scale (test_lora's swap order reinstalls the layers between d and the next adapter of its shape)."""
    import mlx.core as mx
    import mlx_vlm
    from mlx_vlm.utils import prepare_inputs

    from daemon.model.adapters import AdapterManager
    from tests.lora_helpers import random_adapter

    model, processor = mlx_vlm.load(str(smoke_model_path))
    folders = {"c": random_adapter(tmp_path / "c", model, rank=8, scale=2.0, seed=3),
               "d": random_adapter(tmp_path / "d", model, rank=8, scale=0.5, seed=3)}  # c's weights, another scale
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Critique this."}]}],
        tokenize=False, add_generation_prompt=True)
    inputs = prepare_inputs(processor, images=[_photo((56, 56))], prompts=[prompt])

    def logits(m) -> np.ndarray:  # type: ignore[no-untyped-def]
        out = m(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                image_grid_thw=inputs["image_grid_thw"])
        return np.array(getattr(out, "logits", out).astype(mx.float32))

    want = {name: logits(mlx_vlm.load(str(smoke_model_path), adapter_path=str(folder))[0])
            for name, folder in folders.items()}
    assert not np.allclose(want["c"], want["d"], atol=1e-3)
    manager = AdapterManager(model)
    for name in ("c", "d", "c", "d", "c"):
        manager.activate(folders[name])
        np.testing.assert_array_equal(logits(model), want[name], err_msg=f"after swapping to {name}")
        manager.deactivate()
