"""A tiny Qwen2-VL checkpoint with random weights, built offline and deterministically.

It lets tests, CI and the offline demo exercise the whole pipeline (processor, vision tower, chat
template, constrained decoding, LoRA) without downloading 2 B parameters. Its language head is fitted
to a small photography corpus (see `_bigram_weights`), so critiques are schema-valid word soup
("and the frame") rather than empty strings; they mean nothing. `shapes="real"` uses the real
Qwen2-VL-2B-Instruct tensor shapes and the real Qwen2 vocabulary (real_vocab.py: the 233 M-parameter head,
the 151,936-id mask) with plain random weights, so benchmarks measure realistic speed (speed does not depend
on weight values). `shapes="vocab"` is the real vocabulary on a tiny random model, for tests of decoding
against real token boundaries. Both need the benchmark extra (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from . import blas

blas.preload_openblas()  # before the first mlx import (weights are made with mlx)

log = logging.getLogger(__name__)

SMOKE_ALIAS = "smoke"
MARKER_NAME = "mondrian_smoke.json"
# Bump when the recipe changes so existing smoke models are rebuilt instead of silently reused.
RECIPE_VERSION = 2
CLOSE_BONUS = 4.0  # see _bigram_weights
SHAPES = ("smoke", "real", "vocab")
DIR_NAMES = {"smoke": "smoke-qwen2-vl", "real": "smoke-qwen2-vl-real-shapes", "vocab": "smoke-qwen2-vl-real-vocab"}
REAL_VOCAB_RECIPE = "qwen2-vocab-1"  # models on the real vocabulary (shapes real and vocab) carry this too

# Qwen2-VL's special tokens, in Qwen's id order (appended after the BPE vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# Qwen2's pre-tokenizer split (from its tokenizer.json), so the tiny tokenizer segments text like the real one.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2-VL-Instruct's chat template, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small enough to train in milliseconds; photographic enough that random output reads word-ish.
CORPUS = """\
The composition leads the eye from the foreground rocks to the lighthouse on the horizon.
Placing the subject on a third line gives the frame room to breathe and creates tension.
Soft window light wraps around the face and keeps the shadows open and gentle.
Hard midday sun flattens the landscape; return at golden hour when the light is warm and low.
The focus is sharp on the near eye, and the shallow depth of field isolates the portrait.
Motion blur in the water contrasts with the crisp stone of the bridge.
A faster shutter speed would freeze the bird; a slower one would show the sweep of its wings.
The colour palette is harmonious: muted blues and warm ochres support each other.
Complementary colours make the red coat stand out against the green hedge.
The highlights in the sky are clipped, so the clouds lose their texture and detail.
Lift the shadows slightly to recover detail in the dark doorway without losing contrast.
Leading lines of the road pull the viewer deep into the scene and add depth and perspective.
A low camera angle makes the child look confident and gives the street a sense of scale.
The horizon is tilted; level it so the sea does not appear to drain out of the frame.
Negative space on the left balances the weight of the tree on the right.
The background is busy, and the branches compete with the subject for attention.
Try a wider aperture or step closer so the subject separates from the clutter behind it.
The mood is quiet and melancholic, and the fog gives the street an emotional stillness.
Symmetry in the reflection creates calm, while the single boat breaks it with a gentle surprise.
Texture in the weathered wood rewards a close look; side light makes the grain visible.
The exposure is balanced, the white balance feels natural, and the skin tones are true.
Noise in the shadows suggests a high ISO; a tripod and a lower ISO would clean it up.
Framing the dancer inside the doorway adds layers and tells a richer story.
The crop is tight; a little more space in the direction of the gaze would help.
Backlight creates a rim of light around the hair and separates her from the dark wall.
The vanishing point sits in the centre, which feels static; shift it for more energy.
Strong diagonals give the photograph movement, and the repetition of arches adds rhythm.
The image has impact: the expression is honest and the moment feels decisive.
Overall a strong photograph with clear intent, good light and a careful composition.
Consider the edges of the frame, remove distractions, and simplify the scene.
Black and white would emphasise shape, tone and texture over colour.
Golden light, deep shadows, sharp detail, soft bokeh, bold contrast, subtle gradation.
Score the composition, lighting, focus, colour harmony, subject isolation, depth, balance and emotion.
{"dimensions": {"composition": {"comment": "Strong diagonals and a clear subject.", "score": 7}, \
"lighting": {"comment": "Soft light, open shadows.", "score": 8}, "focus_sharpness": {"comment": \
"Sharp on the eye.", "score": 9}, "color_harmony": {"comment": "Muted and calm.", "score": 6}, \
"subject_isolation": {"comment": "Busy background.", "score": 4}, "depth_perspective": {"comment": \
"Layers add depth.", "score": 7}, "visual_balance": {"comment": "Heavy on the right.", "score": 5}, \
"emotional_impact": {"comment": "Quiet and honest.", "score": 8}}, "summary": "A careful, \
honest portrait.", "overall_grade": 7}
{"composition": 7, "lighting": 8, "focus_sharpness": 9, "color_harmony": 6, "subject_isolation": 4, \
"depth_perspective": 7, "visual_balance": 5, "emotional_impact": 8}
"""


def _text_config(shapes: str, vocab_size: int) -> dict[str, Any]:
    if shapes == "real":  # Qwen2-VL-2B-Instruct
        return dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                    num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                    max_window_layers=28, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    if shapes == "vocab":  # the real vocabulary (padded as the real config) on a tiny model: head_dim 16
        return dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=151936, max_window_layers=2,
                    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    # head_dim 64 -> mrope sections must sum to 32. Hidden 256 (not 128) so the bigram head below
    # can tell ~1000 tokens apart; still ~6 M parameters.
    return dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=512, vocab_size=vocab_size, max_window_layers=4,
                rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]})


def _vision_config(shapes: str, hidden_size: int) -> dict[str, Any]:
    common = dict(in_chans=3, patch_size=14, spatial_patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, mlp_ratio=4,  # int: transformers 5 rejects 4.0
                  hidden_size=hidden_size)
    if shapes == "real":
        return dict(common, depth=32, embed_dim=1280, num_heads=16)
    return dict(common, depth=4, embed_dim=128, num_heads=4)


def _train_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=1024, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def _tokenizer_config(tok) -> dict[str, Any]:
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                         "rstrip": False, "single_word": False, "special": True}
             for t in SPECIAL_TOKENS}
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _model_config(shapes: str, tok) -> dict[str, Any]:
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    text = _text_config(shapes, tok.get_vocab_size(with_added_tokens=True))
    return dict(
        text,
        architectures=["Qwen2VLForConditionalGeneration"],
        model_type="qwen2_vl",
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        sliding_window=32768,
        use_sliding_window=False,
        tie_word_embeddings=shapes != "smoke",  # the smoke model needs its own head (bigram weights)
        use_cache=True,
        torch_dtype="float32",
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_config=_vision_config(shapes, text["hidden_size"]),
    )


def _preprocessor_config() -> dict[str, Any]:
    # Qwen2-VL's values; the runtime narrows max_pixels to the configured cap at load time.
    return {
        "min_pixels": 56 * 56,
        "max_pixels": 28 * 28 * 1280,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _bigram_weights(embed: "np.ndarray", tok, seed: int) -> tuple["np.ndarray", "np.ndarray"]:
    """Embeddings and an lm_head that make the model a (rank-limited) bigram model of CORPUS.

    A randomly initialised model decodes greedily into degenerate text (every comment " ").
    With the decoder layers damped, the final hidden state is ~RMSNorm(embedding of the current
    token), so a head solving  RMSNorm(E) @ W.T ~= log P(next | current)  yields word-ish output
    while staying a real Qwen2-VL checkpoint that LoRA can train.
    Greedy bigram chains loop ("the frame roo the frame roo ..."), which would fill every comment
    to maxLength and make smoke runs slow; so "longer word" embeddings share one direction `u` that
    the string-closing tokens' head rows reward: comments end after a few words.
    """
    import numpy as np

    vocab, hidden = embed.shape
    vocab_map = tok.get_vocab()
    closers = sorted(i for t, i in vocab_map.items() if t.startswith('"'))
    words = sorted(i for t, i in vocab_map.items()
                   if t.startswith("\u0120") and t[1:].isalpha() and len(t) >= 6)
    u = np.random.default_rng(seed).standard_normal(hidden)
    u /= np.linalg.norm(u)
    embed = embed.copy()
    embed[words] += np.sqrt((embed**2).sum(1)).mean() * u

    counts = np.zeros((vocab, vocab))
    for line in CORPUS.splitlines():
        ids = tok.encode(line).ids
        np.add.at(counts, (ids[:-1], ids[1:]), 1.0)
    unigram = counts.sum(0) + 1e-3
    rows = counts.sum(1, keepdims=True)
    probs = np.where(rows > 0, counts / np.maximum(rows, 1.0), unigram / unigram.sum())
    target = np.log(probs + 1e-3)
    target -= target.mean(1, keepdims=True)
    x = embed / np.sqrt((embed**2).mean(1, keepdims=True) + 1e-6)
    w_t, *_ = np.linalg.lstsq(x, target, rcond=None)
    head = w_t.T
    head[closers] += CLOSE_BONUS / np.sqrt(hidden / 2) * u  # x @ u ~ sqrt(hidden/2) for the words
    return embed, head


def _write_weights(path: Path, config: dict[str, Any], seed: int, shapes: str, tok) -> int:
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_vlm.models import qwen2_vl
    from mlx_vlm.utils import update_module_configs

    cfg = json.loads(json.dumps(config))  # from_dict mutates its argument
    model_config = qwen2_vl.ModelConfig.from_dict(cfg)
    model_config = update_module_configs(model_config, qwen2_vl, cfg, ["text", "vision"])
    mx.random.seed(seed)
    model = qwen2_vl.Model(model_config)
    if shapes == "smoke":
        lm = model.language_model
        for layer in lm.model.layers:  # damp the residual branches; the image still nudges the logits
            layer.self_attn.o_proj.weight = layer.self_attn.o_proj.weight * 0.05
            layer.mlp.down_proj.weight = layer.mlp.down_proj.weight * 0.05
        embed, head = _bigram_weights(np.array(lm.model.embed_tokens.weight, dtype=np.float64), tok, seed)
        lm.model.embed_tokens.weight = mx.array(embed.astype(np.float32))
        lm.lm_head.weight = mx.array(head.astype(np.float32))
    # mlx-vlm's own parameter names: load() sanitizes them to themselves.
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(list(weights.values()))
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})
    return sum(v.size for v in weights.values())


class SmokeModelUnwritable(OSError):
    """The smoke model could not be written where it goes (a full disk, a read-only folder); says which folder."""


def build_smoke_model(dest: Path, *, seed: int = 0, shapes: str = "smoke") -> Path:
    """Build the checkpoint into `dest` (atomically; a concurrent builder's result is kept)."""
    if shapes not in SHAPES:
        raise ValueError(f"shapes must be one of {SHAPES}, not {shapes!r}")
    dest = Path(dest)
    try:
        return _build(dest, seed, shapes)
    except Exception as exc:  # MLX's save says "[write] Unable to write N bytes to file.", tokenizers "os error 28"
        written = (exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES) if isinstance(exc, OSError)
                   else any(w in str(exc) for w in ("Unable to write", "os error 28", "No space")))
        if isinstance(exc, SmokeModelUnwritable) or not written:
            raise
        full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "Unable to write" in str(exc)
                or "No space left" in str(exc))
        why = "the disk is full" if full else (exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
        raise SmokeModelUnwritable(f"could not build the smoke model in {dest.parent} ({why}): free some space "
                                   f"there (`df -h {dest.parent}` shows how much is left) or make it writable, "
                                   f"then run the command again") from exc


def _build(dest: Path, seed: int, shapes: str) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=dest.parent))
    try:
        if shapes == "smoke":
            tok = _train_tokenizer()
        else:
            from .real_vocab import build_qwen2_tokenizer

            tok = build_qwen2_tokenizer(QWEN2_SPLIT, SPECIAL_TOKENS)
        tok.save(str(tmp / "tokenizer.json"), pretty=False)
        config = _model_config(shapes, tok)
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "tokenizer_config.json", _tokenizer_config(tok))
        _write_json(tmp / "special_tokens_map.json", {
            "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
            "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
        _write_json(tmp / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
        _write_json(tmp / "preprocessor_config.json", _preprocessor_config())
        _write_json(tmp / "video_preprocessor_config.json", _preprocessor_config())
        _write_json(tmp / "processor_config.json", {"processor_class": "Qwen2VLProcessor"})
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": config["bos_token_id"], "pad_token_id": config["bos_token_id"],
            "eos_token_id": [config["eos_token_id"], config["bos_token_id"]], "do_sample": False})
        n_params = _write_weights(tmp / "model.safetensors", config, seed, shapes, tok)
        _write_json(tmp / MARKER_NAME, {"recipe": RECIPE_VERSION, "seed": seed, "shapes": shapes,
                                        "params": n_params, "weights": "random",
                                        **({} if shapes == "smoke" else {"vocab": REAL_VOCAB_RECIPE})})
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            os.rename(tmp, dest)
        except OSError:
            if not is_smoke_model(dest):
                raise
            log.info("another process finished %s first; keeping its copy", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("smoke model (%s shapes, seed %d) ready at %s in %.1f s", shapes, seed, dest,
             time.perf_counter() - started)
    return dest


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(path) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_smoke_model(path: Path) -> bool:
    return read_marker(path) is not None


def ensure_smoke_model(var_dir: Path, *, shapes: str = "smoke") -> Path:
    """Return var_dir/models/<smoke dir>, building it first if it is missing or from an older recipe."""
    if shapes not in SHAPES:
        raise ValueError(f"shapes must be one of {SHAPES}, not {shapes!r}")
    dest = Path(var_dir) / "models" / DIR_NAMES[shapes]
    marker = read_marker(dest)
    if (marker is not None and marker.get("recipe") == RECIPE_VERSION and marker.get("shapes") == shapes
            and marker.get("vocab") == (None if shapes == "smoke" else REAL_VOCAB_RECIPE)):
        return dest
    if dest.exists():
        # Outdated or foreign: move it aside atomically so readers never see a half-deleted model.
        stale = Path(tempfile.mkdtemp(prefix=f".{dest.name}.stale-", dir=dest.parent))
        try:
            os.rename(dest, stale / dest.name)
        except OSError:
            pass  # someone else moved or replaced it
        shutil.rmtree(stale, ignore_errors=True)
    return build_smoke_model(dest, shapes=shapes)
