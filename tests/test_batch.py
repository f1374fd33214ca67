"""Several photos per forward pass (issue 11 item 7): every row writes the text batch 1 writes for its photo.

Real MLX, real llguidance, the real smoke checkpoint and a context-sensitive random one (`plain_model_path`:
a wrong position, a stale or misaligned KV-cache row changes its text; the smoke model has exact ties among
its digits, so a projection computed differently from batch 1 changes its scores).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daemon.analysis.critique import critique_schema
from daemon.analysis.prompts import critique_prompt
from daemon.analysis.advisors import get_advisor
from daemon.config import load_config
from daemon.errors import Cancelled, TimedOut
from daemon.model.protocol import BatchRequest
from daemon.model.runtime import GenerationError, ModelRuntime
from tests.harness import make_home

MAX_PIXELS = 224 * 224
SCHEMA = critique_schema(24)
SYSTEM = "You are a photography advisor."
# Four of one size (a shoot), then a portrait and a landscape (one token count, other grids), a smaller one.
SIZES = [(224, 168)] * 4 + [(168, 224), (224, 168), (112, 112), (224, 224)]


def _photos() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


@pytest.fixture(scope="module")
def prompt(tmp_path_factory: pytest.TempPathFactory) -> str:
    cfg = load_config(make_home(tmp_path_factory.mktemp("home")), env={})
    return critique_prompt(get_advisor(cfg, "ansel"))  # what baseline mode asks


@pytest.fixture(scope="module", params=["plain", "smoke"])
def runtime(request: pytest.FixtureRequest) -> ModelRuntime:
    path: Path = request.getfixturevalue("plain_model_path" if request.param == "plain" else "smoke_model_path")
    return ModelRuntime.load(str(path), var_dir=path.parent, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def alone(runtime: ModelRuntime, prompt: str) -> list:
    """Batch 1: each photo by itself."""
    return [runtime.generate_json(p, prompt, SCHEMA, max_tokens=1400, system=SYSTEM) for p in _photos()]


def test_every_row_writes_batch_1s_text(runtime: ModelRuntime, prompt: str, alone: list) -> None:
    schema = SCHEMA
    photos = _photos()
    assert len({g.text for g in alone}) > 1  # the photos are told apart: a swapped row would show
    for rows in ([0, 1], [4, 5, 6, 0], list(range(8))):
        got = runtime.generate_json_batch([BatchRequest(photos[i], prompt, schema, 1400, system=SYSTEM)
                                           for i in rows])
        for i, g in zip(rows, got):
            assert not isinstance(g, Exception), f"photo {i} of batch {rows}: {g!r}"
            assert g.text == alone[i].text, f"photo {i} in batch {rows} differs from batch 1"
            assert (g.generated_tokens, g.free_tokens, g.prompt_tokens) == \
                (alone[i].generated_tokens, alone[i].free_tokens, alone[i].prompt_tokens)
            assert g.data == alone[i].data


def test_a_batchs_picks_are_read_without_waiting_for_the_pass_queued_on_them(runtime: ModelRuntime, prompt: str,
                                                                             async_evals: list) -> None:
    """As at batch 1 (tests/test_model_runtime.py): a step's picks are evaluated on their own before the pass that
    feeds them in, so reading them does not wait for that pass (MLX signals one event per `async_eval`)."""
    from tests.mlx_reference import picks_and_passes

    got = runtime.generate_json_batch([BatchRequest(p, prompt, SCHEMA, 1400, system=SYSTEM) for p in _photos()[:3]])
    assert not [g for g in got if isinstance(g, Exception)]
    picks, passes = picks_and_passes(async_evals, runtime.model.language_model.args.hidden_size)
    assert len(picks) >= max(g.free_tokens for g in got) - 1
    assert set(i + 1 for i in picks) <= set(passes)  # a pick's evaluation, then its pass's, nothing between


def test_a_row_that_fails_fails_alone(runtime: ModelRuntime, prompt: str, alone: list) -> None:
    schema = SCHEMA
    photos = _photos()[:4]
    stop = threading.Event()
    stop.set()
    short = alone[0].generated_tokens // 2
    requests = [BatchRequest(photos[0], prompt, schema, short, system=SYSTEM),  # runs out of tokens midway
                BatchRequest(photos[1], prompt, schema, 1400, system=SYSTEM),
                BatchRequest(photos[2], prompt, schema, 1400, system=SYSTEM, deadline=time.monotonic() - 1),
                BatchRequest(photos[3], prompt, schema, 1400, system=SYSTEM, cancel=stop)]
    got = runtime.generate_json_batch(requests)
    assert isinstance(got[0], GenerationError) and "max_tokens" in str(got[0])
    assert alone[0].text.startswith(got[0].text) and len(got[0].text) < len(alone[0].text)
    with pytest.raises(GenerationError) as single:  # the same failure batch 1 gives
        runtime.generate_json(photos[0], prompt, schema, max_tokens=short, system=SYSTEM)
    assert (str(got[0]), got[0].text) == (str(single.value), single.value.text)
    assert not isinstance(got[1], Exception) and got[1].text == alone[1].text
    assert isinstance(got[2], TimedOut) and isinstance(got[3], Cancelled)


def test_a_batch_through_an_adapter_writes_what_each_photo_gets_alone(runtime: ModelRuntime, prompt: str,
                                                                      alone: list, tmp_path: Path) -> None:
    """lora mode: the adapter is in place for the whole batch, and gone after it."""
    from tests.lora_helpers import random_adapter

    adapter = random_adapter(tmp_path / "adapter", runtime.model, seed=3)
    photos = _photos()[:4]
    single = [runtime.generate_json(p, prompt, SCHEMA, max_tokens=1400, system=SYSTEM, adapter=adapter)
              for p in photos]
    assert [g.text for g in single] != [g.text for g in alone[:4]]  # the adapter changes what it writes
    got = runtime.generate_json_batch([BatchRequest(p, prompt, SCHEMA, 1400, system=SYSTEM) for p in photos],
                                      adapter=adapter)
    assert [g.text for g in got] == [g.text for g in single]
    after = runtime.generate_json_batch([BatchRequest(p, prompt, SCHEMA, 1400, system=SYSTEM) for p in photos[:2]])
    assert [g.text for g in after] == [g.text for g in alone[:2]]


def test_a_quantized_models_batch_writes_what_each_photo_gets_alone(plain_model_path: Path, prompt: str) -> None:
    """At 4 bits the vocabulary projection is the quantized head's, over the whole vocabulary (reuse._Head)."""
    import mlx.nn as nn

    runtime = ModelRuntime.load(str(plain_model_path), var_dir=plain_model_path.parent, max_pixels=MAX_PIXELS)
    nn.quantize(runtime.model.language_model, group_size=64, bits=4)
    runtime._quantized = None
    photos = _photos()[:4]
    alone = [runtime.generate_json(p, prompt, SCHEMA, max_tokens=1400, system=SYSTEM) for p in photos]
    assert runtime.quantized
    got = runtime.generate_json_batch([BatchRequest(p, prompt, SCHEMA, 1400, system=SYSTEM) for p in photos])
    assert [g.text for g in got] == [g.text for g in alone]


def test_rags_two_passes_in_batches_write_what_each_photo_gets_alone(runtime: ModelRuntime, prompt: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """rag: pass 1 and pass 2 of encoded photos, each pass one batch: the vision tower runs once a photo, and the
    texts are batch 1's, where pass 2 reads pass 1's KV cache for the prefix both share."""
    from daemon.analysis.critique import profile_schema

    photos = _photos()[:4]
    first, second = "Score the photograph.", prompt
    alone = []
    for p in photos:
        enc = runtime.encode(p)
        one = runtime.generate_json(p, first, profile_schema(), max_tokens=256, encoded=enc)
        two = runtime.generate_json(p, second, SCHEMA, max_tokens=1400, encoded=enc)
        assert two.reused_tokens > 0
        alone.append((one.text, two.text))
    vision = type(runtime.model.vision_tower)
    real_call = vision.__call__
    calls = []
    monkeypatch.setattr(vision, "__call__", lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k))
    encs = [runtime.encode(p) for p in photos]
    ones = runtime.generate_json_batch([BatchRequest(p, first, profile_schema(), 256, encoded=e)
                                        for p, e in zip(photos, encs)])
    twos = runtime.generate_json_batch([BatchRequest(p, second, SCHEMA, 1400, encoded=e)
                                        for p, e in zip(photos, encs)])
    assert len(calls) == len(photos)
    assert [(a.text, b.text) for a, b in zip(ones, twos)] == alone


@pytest.mark.parametrize("sizes,fused", [(((224, 168),) * 3, True),
                                         (((224, 168), (336, 112), (168, 224), (112, 336)), False)])
def test_batches_on_the_fused_rope_write_what_mlx_vlm_writes_for_each_photo(plain_model_path: Path, sizes: tuple,
                                                                            fused: bool) -> None:
    """On a GPU the decode passes rotate with mx.fast.rope (text_rope.py), forced here on the CPU. One shoot's
    photos (one grid: the same text positions in every row) take it, in the flat one-token pass (flat_step.py);
    photos of one token count whose grids shift the positions differently (6x8 and 4x12 patches: an image advances
    them by its longer side) must not while they share a pass, since MLX's CUDA kernel takes one offset for the
    whole batch. Either way each row writes what mlx-vlm's own generate writes for its photo alone. A short prompt: after the advisor's long one this small model writes
    much the same for every photo, and a row rotated from another row's position went unseen."""
    from daemon.model import flat_step, text_rope
    from tests.mlx_reference import mlx_vlm_text

    prompt = "Critique this photograph."
    runtime = ModelRuntime.load(str(plain_model_path), var_dir=plain_model_path.parent, max_pixels=MAX_PIXELS)
    assert text_rope.install(runtime.model, always=True)
    lm = runtime.model.language_model
    rng = np.random.default_rng(11)
    photos = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    theirs = [mlx_vlm_text(runtime, photo, prompt, SCHEMA, max_tokens=1400) for photo in photos]
    assert len(set(theirs)) == len(photos)  # each photo its own text: a row that took another's would show
    calls = flat_step.calls(lm)
    got = runtime.generate_json_batch([BatchRequest(photo, prompt, SCHEMA, 1400) for photo in photos])
    if fused:  # the flat one-token pass (mixed rows may take it later, once the rows left share one shift)
        assert flat_step.calls(lm) > calls
    for i, (g, text) in enumerate(zip(got, theirs)):
        assert not isinstance(g, Exception), f"photo {i}: {g!r}"
        assert g.text == text, f"photo {i} in a batch differs from mlx-vlm's generate"


def test_a_batchs_time_is_charged_to_the_photos_in_it_and_none_is_lost(runtime: ModelRuntime, prompt: str) -> None:
    """Each photo's own time limit in a batch (`limits.TimeShare`): every second the batch takes is charged to the
    photos being worked on (a pass split between the rows in it, a photo's vision tower to that photo), so the
    charges add up to the batch's time. Rows that finish leave the share: were they kept in it, the last row would
    be charged a fraction of its passes and run past its own limit (issue 11 item 7). Here three rows stop early
    (a max_tokens of 40) and the fourth goes on alone for most of the batch."""
    from daemon.limits import TimeShare

    photos = _photos()[:4]  # one size: one group
    shares = [TimeShare(3600.0, among=len(photos)) for _ in photos]
    started = time.monotonic()
    out = runtime.generate_json_batch([BatchRequest(p, prompt, SCHEMA, 1400 if i == 0 else 40, system=SYSTEM,
                                                    deadline=s) for i, (p, s) in enumerate(zip(photos, shares))])
    took = time.monotonic() - started
    assert not isinstance(out[0], Exception) and all(isinstance(o, GenerationError) for o in out[1:]), out
    charged = sum(s.spent() for s in shares)
    assert 0.9 * took <= charged <= took * 1.01 + 0.01, (charged, took, [round(s.spent(), 3) for s in shares])
