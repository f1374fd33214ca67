"""daemon/model/fused_proj.py: q, k, v (and gate, up) as one matmul in the decode loop, on the real plain-random
smoke model (its output depends on the context, so a wrong split or a stale weight changes the numbers)."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daemon.analysis.critique import critique_schema
from daemon.model.runtime import ModelRuntime
from tests.mlx_reference import mlx_vlm_ids

MAX_PIXELS = 224 * 224


def _photo() -> Image.Image:
    x = np.tile(np.linspace(0, 255, 160, dtype=np.uint8), (120, 1))
    return Image.fromarray(np.stack([x, x[:, ::-1], np.full_like(x, 90)], axis=-1))


def _load(path: Path, bits: int | None = 4) -> ModelRuntime:
    """The runtime with the stacked projections installed as on a GPU. At 4 bits (the default precision) they
    give mlx-vlm's numbers bit for bit on the CPU too; in float32 OpenBLAS rounds a wider matmul differently."""
    import mlx.nn as nn

    from daemon.model import fused_proj

    rt = ModelRuntime.load(str(path), var_dir=path.parent, max_pixels=MAX_PIXELS)
    assert fused_proj.install(rt.model) == fused_proj.worth_it()  # the runtime's own choice: on a GPU only
    if bits:
        nn.quantize(rt.model.language_model, group_size=64, bits=bits)
        rt._quantized = None
    assert fused_proj.install(rt.model, always=True)
    return rt


def _passes(lm, fused: bool) -> np.ndarray:  # type: ignore[no-untyped-def]
    """A prompt pass, then a three-token pass and a one-token pass: the decode loop's two kinds of pass."""
    import mlx.core as mx
    from mlx_vlm.models import cache as mlx_cache

    from daemon.model.fused_proj import fused_decoding

    kv = mlx_cache.make_prompt_cache(lm)
    mx.eval(lm.model(mx.array([[5, 17, 300, 42, 7, 99, 1000, 3]]), cache=kv))
    out = []
    for tokens in ([[64, 65, 66]], [[70]]):
        if fused:
            with fused_decoding(lm):
                hidden = lm.model(mx.array(tokens), cache=kv)
        else:
            hidden = lm.model(mx.array(tokens), cache=kv)
        out.append(np.array(hidden[0, -1]))
    return np.stack(out)


@pytest.mark.parametrize("bits", [None, 4])
def test_stacked_projections_give_mlx_vlms_hidden_states(plain_model_path: Path, bits: int | None) -> None:
    """A multi-token pass and a one-token pass: bit for bit at 4 bits (the default), to float32 rounding in float32;
    each layer takes the stacked path twice a pass inside `fused_decoding` and never outside it."""
    from daemon.model.fused_proj import fused_calls

    rt = _load(plain_model_path, bits)
    lm = rt.model.language_model
    before = fused_calls(lm)
    plain = _passes(lm, fused=False)
    assert fused_calls(lm) == before  # outside the block: mlx-vlm's own layers
    fast = _passes(lm, fused=True)
    assert fused_calls(lm) - before == 2 * 2 * len(lm.layers)  # two passes, attention and MLP in each layer
    after = fused_calls(lm)
    _passes(lm, fused=False)
    assert fused_calls(lm) == after  # the block leaves mlx-vlm's layers behind it
    if bits:
        assert np.array_equal(fast, plain)
    else:
        np.testing.assert_allclose(fast, plain, rtol=0, atol=1e-4)


def test_stacking_takes_no_memory_of_its_own(plain_model_path: Path) -> None:
    """Each projection's weight becomes a view of the stacked one: the model's memory does not grow."""
    import mlx.core as mx

    from daemon.model.fused_proj import stacks

    rt = _load(plain_model_path, bits=None)
    lm = rt.model.language_model
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    _passes(lm, fused=True)
    stacked = sum(a.nbytes for s in stacks(lm) for a in s.arrays.values())
    gc.collect()
    mx.clear_cache()
    grown = mx.get_active_memory() - before
    assert stacked > 1_000_000
    assert grown < stacked / 10, f"memory grew {grown} bytes for {stacked} bytes of stacked weights"


def test_a_dropped_model_frees_its_stacked_weights_at_once(plain_model_path: Path) -> None:
    """No reference cycle through the stacks: a model let go (a reload, a test's runtime) returns its memory when
    its last reference goes, not whenever the garbage collector next runs."""
    import mlx.core as mx

    from daemon.model.fused_proj import stacks

    gc.collect()
    gc.disable()
    try:
        mx.clear_cache()
        before = mx.get_active_memory()
        rt = _load(plain_model_path, bits=None)
        lm = rt.model.language_model
        _passes(lm, fused=True)
        assert sum(s.stacks for s in stacks(lm)) == 2 * len(lm.layers)
        del rt, lm
        mx.clear_cache()
        left = mx.get_active_memory() - before
    finally:
        gc.enable()
    assert left < 1_000_000, f"{left} bytes still held after the model was dropped"


def test_replaced_weights_are_stacked_again_not_served_stale(plain_model_path: Path) -> None:
    """`load_weights` (or quantizing) puts new arrays in the modules: the next decode pass stacks those."""
    import mlx.core as mx

    from daemon.model.fused_proj import stacks

    rt = _load(plain_model_path)
    lm = rt.model.language_model
    _passes(lm, fused=True)
    first = sum(s.stacks for s in stacks(lm))
    layer = lm.layers[1]
    rt.model.load_weights([("language_model.model.layers.1.self_attn.k_proj.scales", layer.self_attn.k_proj.scales * 3),
                           ("language_model.model.layers.1.mlp.up_proj.scales", layer.mlp.up_proj.scales * -1)],
                          strict=False)
    mx.eval(rt.model.parameters())
    fast = _passes(lm, fused=True)
    assert sum(s.stacks for s in stacks(lm)) == first + 2
    assert np.array_equal(fast, _passes(lm, fused=False))


def test_an_adapters_photo_takes_mlx_vlms_layers_and_the_base_is_stacked_after(plain_model_path: Path,
                                                                               tmp_path: Path) -> None:
    """lora mode: with LoRA layers in q/k/v and gate/up the stacked weights would skip the adapter; those photos
    run mlx-vlm's layers, write what mlx-vlm writes through the adapter, and the base photo after it is stacked
    again without restacking (the adapter swap leaves the base modules as they were)."""
    from daemon.model.fused_proj import fused_calls, stacks
    from tests.lora_helpers import random_adapter

    rt = _load(plain_model_path)
    lm = rt.model.language_model
    schema = critique_schema(40)
    photo = _photo()
    base = rt.generate_json(photo, "Critique this photograph.", schema, max_tokens=1400)
    stacked = sum(s.stacks for s in stacks(lm))
    float_model = ModelRuntime.load(str(plain_model_path), var_dir=plain_model_path.parent, max_pixels=MAX_PIXELS).model
    adapter = random_adapter(tmp_path / "adapter", float_model, seed=5)  # LoRA shapes from unpacked weights
    calls = fused_calls(lm)
    with rt.use_adapter(adapter):
        theirs = rt.tokenizer.decode(mlx_vlm_ids(rt, photo, "Critique this photograph.", schema, max_tokens=1400),
                                     skip_special_tokens=False)
    ours = rt.generate_json(photo, "Critique this photograph.", schema, max_tokens=1400, adapter=adapter)
    assert fused_calls(lm) == calls  # every pass through the adapter ran mlx-vlm's layers
    assert ours.text == theirs != base.text
    again = rt.generate_json(photo, "Critique this photograph.", schema, max_tokens=1400)
    assert again.text == base.text
    assert fused_calls(lm) > calls and sum(s.stacks for s in stacks(lm)) == stacked


def test_a_critique_on_stacked_projections_is_exactly_mlx_vlms(plain_model_path: Path) -> None:
    """The runtime installs the stacked projections on every device; its decode loop takes them and writes what
    mlx-vlm's own `generate` writes."""
    from daemon.model.fused_proj import fused_calls

    rt = _load(plain_model_path)
    lm = rt.model.language_model
    schema = critique_schema(40)
    photo = _photo()
    ids = mlx_vlm_ids(rt, photo, "Critique this photograph.", schema, max_tokens=1400)
    calls = fused_calls(lm)
    ours = rt.generate_json(photo, "Critique this photograph.", schema, max_tokens=1400)
    assert ours.text == rt.tokenizer.decode(ids, skip_special_tokens=False)
    assert fused_calls(lm) - calls >= 2 * len(lm.layers) * ours.forward_passes


def test_a_batch_on_stacked_projections_writes_what_mlx_vlm_writes_for_each_photo(plain_model_path: Path) -> None:
    """A deep inbox: several photos a pass through the stacked projections (with the GPU's fused RoPE too), rows
    of one grid and rows whose images shift positions differently; each row writes mlx-vlm's text for its photo."""
    from daemon.model import text_rope
    from daemon.model.fused_proj import fused_calls
    from daemon.model.protocol import BatchRequest
    from tests.mlx_reference import mlx_vlm_text

    rt = _load(plain_model_path)
    assert text_rope.install(rt.model, always=True)
    lm = rt.model.language_model
    schema = critique_schema(40)
    rng = np.random.default_rng(11)
    photos = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
              for w, h in ((224, 168), (224, 168), (336, 112), (112, 336))]
    theirs = [mlx_vlm_text(rt, photo, "Critique this photograph.", schema, max_tokens=1400) for photo in photos]
    assert len(set(theirs)) == len(photos)
    calls = fused_calls(lm)
    got = rt.generate_json_batch([BatchRequest(photo, "Critique this photograph.", schema, 1400) for photo in photos])
    assert fused_calls(lm) > calls
    for i, (g, text) in enumerate(zip(got, theirs)):
        assert not isinstance(g, Exception), f"photo {i}: {g!r}"
        assert g.text == text, f"photo {i} in a batch differs from mlx-vlm's generate"


def test_projections_that_cannot_be_stacked_run_mlx_vlms_layers(plain_model_path: Path, caplog,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Stacking that fails (no memory for the stacked copy) is said once and leaves mlx-vlm's layers in place;
    a group of mixed dtypes is not stacked at all (concatenating would promote the bfloat16 weight)."""
    import logging

    import mlx.core as mx

    from daemon.model import fused_proj
    from daemon.model.fused_proj import Stacked, fused_calls, stacks

    rt = _load(plain_model_path)
    lm = rt.model.language_model
    schema = critique_schema(40)
    photo = _photo()
    ids = mlx_vlm_ids(rt, photo, "Critique this photograph.", schema, max_tokens=1400)

    def no_memory(self, modules) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("[malloc] Unable to allocate 117440512 bytes")

    monkeypatch.setattr(Stacked, "_stack", no_memory)
    monkeypatch.setattr(fused_proj, "_warned", set())
    with caplog.at_level(logging.DEBUG, logger="daemon.model.fused_proj"):
        ours = rt.generate_json(photo, "Critique this photograph.", schema, max_tokens=1400)
    assert ours.text == rt.tokenizer.decode(ids, skip_special_tokens=False)
    assert fused_calls(lm) == 0 and all(s.failed for s in stacks(lm))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Unable to allocate" in warnings[0].getMessage()

    monkeypatch.undo()
    float_rt = _load(plain_model_path, bits=None)
    attn = float_rt.model.language_model.layers[0].self_attn
    attn.k_proj.weight = attn.k_proj.weight.astype(mx.bfloat16)
    stacked = attn.__dict__["_qkv"]
    assert not stacked.ready(attn) and stacked.stacks == 0
    assert attn.k_proj.weight.dtype == mx.bfloat16 and attn.q_proj.weight.dtype == mx.float32
