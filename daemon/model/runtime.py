"""The one place that runs the vision-language model: load it, and turn (photo, prompt, schema) into JSON.

Everything MLX lives behind `ModelRuntime`, so the rest of the daemon never imports mlx. MLX is not
thread-safe: create the runtime and call it from one thread (the worker's).
"""

from __future__ import annotations

from . import blas, cuda_env

blas.preload_openblas()  # must precede the first `import mlx` in the process
cuda_env.apply_defaults()  # must precede the first kernel MLX runs

import contextlib
import logging
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema

from ..config import is_true
from ..errors import Permanent
from ..hints import shell_word
from ..limits import Deadline, check as check_limits, share_time
from .smoke import SMOKE_ALIAS, SmokeModelUnwritable, ensure_smoke_model, read_marker

if TYPE_CHECKING:
    from PIL import Image

    from .protocol import BatchRequest
    from .reuse import EncodedPhoto, ReuseOutput
    from .scoring import ScoreReader

log = logging.getLogger(__name__)

DEFAULT_HUB_MODEL = "mlx-community/Qwen2-VL-2B-Instruct-4bit"
SMOKE_MODEL_ID = "mondrian-smoke-qwen2-vl (random weights)"
MIN_PIXELS = 56 * 56  # Qwen2-VL's own floor (4 image tokens)
CACHE_LIMIT_MIN, CACHE_LIMIT_MAX = 64 << 20, 2 << 30
# The files mlx_vlm.load needs from a hub snapshot (same patterns mlx-vlm downloads).
_HUB_PATTERNS = ["*.json", "*.jsonl", "*.safetensors", "*.py", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(RuntimeError):
    """The configured model is not on this machine and cannot be fetched; the message says how to get it."""


class GenerationError(Permanent, RuntimeError):
    """The model produced no valid JSON (e.g. ran out of tokens); `text` holds what it did produce. Permanent:
    decoding is greedy, so the same photo fails the same way again and the worker must not retry it."""

    def __init__(self, message: str, text: str = "") -> None:
        super().__init__(message)
        self.text = text


class PromptTooLong(Permanent, ValueError):
    """A prompt (an advisor's, with rag's portfolio context) past PROMPT_MAX_TOKENS: refused before the prefill,
    whose attention over tens of thousands of tokens asked the CPU for 51 GB and took the daemon down."""


# A critique's prompt is an advisor's voice (a few hundred tokens) and, for rag, a few references' notes; 8,192 is
# many times that, and a prefill of that length fits the memory of any machine that runs the model.
PROMPT_MAX_TOKENS = 8192


@dataclass
class Generation:
    data: dict
    text: str
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    reused_tokens: int = 0  # prompt tokens served from an encoded photo's KV cache (see `encode`)
    forward_passes: int | None = None  # decode steps, when schema-forced tokens were fast-forwarded
    free_tokens: int | None = None  # tokens the model chose (the rest the schema forced), where counted


def _hub_cli(name: str) -> str:
    """huggingface_hub's command as a shell reaches it: installed beside this Python (a checkout's .venv/bin, not
    on PATH unless the venv is activated), named by its path."""
    beside = Path(sys.executable).parent / name
    # Named by its path whenever it is this install's: the service and its start-up check run with the venv first on
    # their PATH, so a bare `hf` was found there, and printed for a shell that does not have it.
    found = shutil.which(name)
    if beside.exists() and (found is None or Path(found).parent == beside.parent):
        return shell_word(beside)
    return name


def _how_to_get(spec: str) -> str:
    hub_id = spec if _REPO_ID.match(spec) else DEFAULT_HUB_MODEL
    return (f"To get a model: `{_hub_cli('hf')} download {hub_id}` (older huggingface_hub: "
            f"`{_hub_cli('huggingface-cli')} download {hub_id}`; needs network once), "
            f"or set MONDRIAN_MODEL (or `model` in mondrian.toml) to a local folder holding an MLX "
            f"checkpoint, or use `--model {SMOKE_ALIAS}` for the offline smoke model (random weights).")


def _offline() -> bool:
    # Read the environment at call time: huggingface_hub snapshots HF_HUB_OFFLINE when it is imported.
    return is_true(os.environ.get("HF_HUB_OFFLINE", ""))


def _looks_like_path(spec: str) -> bool:
    return (spec.startswith(("/", ".", "~")) or spec.endswith("/") or spec.count("/") > 1
            or "\\" in spec or not _REPO_ID.match(spec))


def resolve_model_path(spec: str, var_dir: Path, *, download: bool = True) -> Path:
    """Map a model spec to a local checkpoint folder; raises ModelNotFoundError (never hangs offline). With
    `download=False` a hub id not cached yet is not found (a fingerprint is not worth gigabytes)."""
    spec = spec.strip()
    if spec == SMOKE_ALIAS:
        try:
            return ensure_smoke_model(var_dir)
        except SmokeModelUnwritable as exc:  # a setting-like fault: said once, exit 78, not a retry per photo
            raise ModelNotFoundError(str(exc)) from exc
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"{local} is not a model folder (no config.json). {_how_to_get(spec)}")
        return local.resolve()
    if _looks_like_path(spec):
        raise ModelNotFoundError(f"model folder {spec!r} does not exist. {_how_to_get(spec)}")

    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception as exc:  # not cached (LocalEntryNotFoundError and friends)
        cached_error = exc
    if not download:
        raise ModelNotFoundError(f"model {spec!r} is not in the local Hugging Face cache") from cached_error
    if _offline():
        raise ModelNotFoundError(f"model {spec!r} is not in the local Hugging Face cache and "
                                 f"HF_HUB_OFFLINE is set. {_how_to_get(spec)}") from cached_error
    log.info("downloading %s from the Hugging Face hub", spec)
    try:
        return Path(snapshot_download(spec, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:
        raise ModelNotFoundError(f"could not download model {spec!r} ({type(exc).__name__}: {exc}). "
                                 f"{_how_to_get(spec)}") from exc


def _cap_pixels(processor: Any, max_pixels: int) -> None:
    """Make the processor resize to at most `max_pixels`, for inference and training alike."""
    min_pixels = min(MIN_PIXELS, max_pixels)
    for proc in (getattr(processor, "image_processor", None), getattr(processor, "video_processor", None)):
        if proc is None:
            continue
        if hasattr(proc, "max_pixels"):
            proc.max_pixels = max_pixels
            proc.min_pixels = min(getattr(proc, "min_pixels", min_pixels) or min_pixels, max_pixels)
        size = getattr(proc, "size", None)
        if isinstance(size, dict) and "longest_edge" in size:  # transformers' Qwen2-VL processors
            size["longest_edge"] = max_pixels
            size["shortest_edge"] = min(size.get("shortest_edge") or min_pixels, max_pixels)


def _matmul_backend() -> str:
    """Where this process's products run, for the model's load line: the GPU, or the CPU and its BLAS."""
    import mlx.core as mx

    if mx.default_device().type == mx.gpu:
        return "GPU"
    return f"CPU, BLAS {blas.described()}" if sys.platform.startswith("linux") else "CPU"


def _limit_cache(model: Any) -> int:
    """Cap MLX's cache of freed buffers at a quarter of the weights (64 MiB to 2 GiB): enough to reuse a photo's
    prefill and decode buffers, where MLX's own default (the whole memory limit) lets it grow photo after photo."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = sum(int(v.nbytes) for _, v in tree_flatten(model.parameters()))
    limit = min(max(weights // 4, CACHE_LIMIT_MIN), CACHE_LIMIT_MAX)
    mx.set_cache_limit(limit)
    return limit


def release_thread() -> None:
    """Drain this thread's queued MLX work and free its streams; call it last on the thread that ran the model.

    Generation is asynchronous (mlx-vlm queues the next token on a thread-local stream). A stop that interrupts
    it leaves work in flight, and a thread that exits like that can make the C++ runtime abort the whole
    process ("terminate called without an active exception") instead of exiting 0.
    """
    import sys

    if "mlx.core" not in sys.modules:  # nothing ever ran here
        return
    import mlx.core as mx

    try:
        from mlx_vlm.generate import generation_stream

        mx.synchronize(generation_stream)
    except Exception:  # noqa: BLE001 - an older mlx-vlm without the thread-local stream
        pass
    mx.synchronize()
    clear_streams = getattr(mx, "clear_streams", None)
    if clear_streams is not None:
        clear_streams()


class ModelRuntime:
    """A loaded model + processor + the llguidance tokenizer built for them.

    `model` and `processor` are public on purpose: LoRA training must use this exact processor
    (same pixel cap, same chat template) and can swap adapters on this `model` in place.
    """

    def __init__(self, *, model: Any, processor: Any, model_id: str, path: str, is_smoke: bool,
                 max_pixels: int) -> None:
        from . import fused_proj, reuse, text_rope
        from .constrained import SchemaConstraint

        if reuse.supports(model):
            text_rope.install(model)  # on a GPU the decode loop's tokens rotate with one fused kernel each
            fused_proj.install(model)  # and project q, k, v (and gate, up) with one matmul each
        self.model = model
        self.processor = processor
        self.model_id = model_id
        self.path = path
        self.is_smoke = is_smoke
        self.max_pixels = max_pixels
        self.tokenizer = getattr(processor, "tokenizer", processor)
        vocab = getattr(getattr(model.config, "text_config", None), "vocab_size", None) \
            or getattr(model.config, "vocab_size")
        started = time.perf_counter()
        self.constraint = SchemaConstraint(self.tokenizer, int(vocab))
        log.debug("llguidance tokenizer built in %.2f s", time.perf_counter() - started)
        self._lock = threading.Lock()  # a second caller waits instead of corrupting MLX state
        self._scores: "ScoreReader | None" = None  # built on first use: evaluation only

    @classmethod
    def load(cls, spec: str, *, var_dir: Path, max_pixels: int) -> "ModelRuntime":
        path = resolve_model_path(spec, Path(var_dir))
        marker = read_marker(path)
        is_smoke = marker is not None
        started = time.perf_counter()
        import mlx_vlm

        try:
            model, processor = mlx_vlm.load(str(path))
        except (FileNotFoundError, OSError) as exc:
            raise ModelNotFoundError(f"could not load model from {path} ({exc}). {_how_to_get(spec)}") from exc
        _cap_pixels(processor, max_pixels)
        _limit_cache(model)
        if spec.strip() == SMOKE_ALIAS:
            model_id = SMOKE_MODEL_ID
        elif is_smoke:
            model_id = f"{spec} (smoke model, {marker.get('shapes', 'smoke')} shapes, random weights)"
        else:
            model_id = spec
        runtime = cls(model=model, processor=processor, model_id=model_id, path=str(path),
                      is_smoke=is_smoke, max_pixels=max_pixels)
        log.info("model %s loaded from %s in %.1f s (max_pixels=%d, %s)", model_id, path,
                 time.perf_counter() - started, max_pixels, _matmul_backend())
        return runtime

    def format_prompt(self, prompt: str, *, system: str | None = None) -> str:
        """The chat-templated text for one image + one user prompt (image first, as Qwen2-VL expects)."""
        words = len(self.tokenizer.encode(prompt + (system or ""), add_special_tokens=False))
        if words > PROMPT_MAX_TOKENS:
            raise PromptTooLong(f"the prompt is {words:,} tokens, more than the {PROMPT_MAX_TOKENS:,} Mondrian gives "
                                f"a critique: shorten the advisor's prompt in advisors/<id>/advisor.toml (for rag, a "
                                f"lower rag_k shortens it too)")
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]})
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # A GPU decode step is launch-bound: 4 photos a pass gave 2.0x the photos per minute on an H200 at real shapes
    # (bf16 and 4-bit), 8 gave 2.6-4.0x; a CPU step is compute-bound (1.2x at 4). bench/RESULTS.md `batch`.
    GPU_BATCH = 4

    @property
    def suggested_batch_size(self) -> int:
        """What `batch_size = 0` (the default) means on this machine: several photos a pass on a GPU, one on a CPU."""
        if getattr(self, "_suggested_batch", None) is None:
            import mlx.core as mx

            self._suggested_batch = self.GPU_BATCH if mx.default_device().type == mx.gpu else 1
        return self._suggested_batch

    @property
    def quantized(self) -> bool:
        """Whether the language model's projections are quantized (the default 4-bit model)."""
        if getattr(self, "_quantized", None) is None:
            import mlx.nn as nn

            lm = getattr(self.model, "language_model", self.model)
            self._quantized = any(isinstance(m, nn.QuantizedLinear) for _, m in lm.named_modules())
        return self._quantized

    # -- LoRA adapters (issue 5): one base model, adapter weights swapped per photo ----------------
    @property
    def adapters(self) -> Any:
        """The `AdapterManager` of this model, created on first use (base-only runs never install LoRA)."""
        if getattr(self, "_adapters", None) is None:
            from .adapters import AdapterManager

            self._adapters = AdapterManager(self.model)
        return self._adapters

    @contextlib.contextmanager
    def use_adapter(self, adapter: str | Path | None):
        """Run the block with `adapter`'s weights in the model (None: the base model), then go back to the base.

        Outside such a block the model is always the plain base model, so code that calls the model
        directly can never see an advisor's adapter. Anything cached from model activations (prompt KV
        caches) must include the yielded key. Call it from the thread that owns the model.
        """
        if adapter is None and getattr(self, "_adapters", None) is None:
            yield None
            return
        key = self.adapters.activate(adapter)
        try:
            yield key
        finally:
            self.adapters.deactivate()

    def generate_json(self, image: "Image.Image", prompt: str, schema: dict, *, max_tokens: int,
                      system: str | None = None, adapter: str | Path | None = None,
                      encoded: "EncodedPhoto | None" = None, cancel: threading.Event | None = None,
                      deadline: Deadline | None = None) -> Generation:
        """Greedy, schema-constrained generation: same inputs give the same text; the result always validates.

        `cancel` (set: stop) and `deadline` (a `time.monotonic()` value) are checked before every decoded
        token; they raise `daemon.limits.AnalysisCancelled` / `AnalysisTimedOut` (issue 3).

        `adapter` is a LoRA adapter folder (e.g. `adapters/<advisor>/<version>`); None is the base model.
        `encoded` (from `encode(image)`) reuses that photo's vision features and the KV cache of the prompt
        prefix shared with its previous call; `image` is then ignored. Without it the photo is encoded here.
        """
        from mlx_vlm.generate import stream_generate

        check_limits(cancel, deadline)
        if encoded is None:
            # A single pass takes the encode-once path where the model supports it (reuse.py): the same greedy
            # text, but schema-forced tokens cost no decode step of their own and the vocabulary projection
            # covers only the last position. Quantized models too: once both loops are warmed up on a full-size
            # photo, ours is the faster one at 4 bits as well (bench/RESULTS.md, the H200 rows).
            encoded = self.encode(image)
        if encoded is not None and encoded.features is not None:
            return self._generate_encoded(encoded, prompt, schema, max_tokens=max_tokens, system=system,
                                          adapter=adapter, cancel=cancel, deadline=deadline)
        if encoded is not None:
            image = encoded.image
        if image.mode != "RGB":
            image = image.convert("RGB")
        text_prompt = self.format_prompt(prompt, system=system)
        with self._lock, self.use_adapter(adapter):
            constraint = self.constraint.logits_processor(schema)

            def limited(tokens: Any, logits: Any) -> Any:  # one check per decoded token
                check_limits(cancel, deadline)
                return constraint(tokens, logits)

            started = time.perf_counter()
            final = None
            for final in stream_generate(self.model, self.processor, text_prompt, image=[image],
                                         max_tokens=max_tokens, temperature=0.0,
                                         logits_processors=[limited]):
                pass
            seconds = time.perf_counter() - started
        if final is None:
            raise GenerationError("the model produced nothing")
        ids = [int(t) for t in (final.token_ids or [])]
        stop_ids = set(getattr(getattr(self.tokenizer, "stopping_criteria", None), "eos_token_ids", None)
                       or [self.tokenizer.eos_token_id])
        while ids and ids[-1] in stop_ids:
            ids.pop()
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if final.finish_reason != "stop" or not constraint.done:
            raise GenerationError(
                f"the model used all {max_tokens} tokens before the JSON closed; raise max_tokens (or lower "
                f"comment_max_chars) in mondrian.toml (got {len(text)} chars)", text)
        from .reuse import parse

        try:
            data = parse(text, schema)
        except (ValueError, jsonschema.ValidationError) as exc:
            raise GenerationError(f"constrained output does not match the schema: {exc}", text) from exc
        return Generation(data=data, text=text, prompt_tokens=int(final.prompt_tokens),
                          generated_tokens=len(ids), seconds=seconds, free_tokens=constraint.free)

    # -- reading scores (adapter evaluation) ------------------------------------------------------------
    def expected_scores(self, image: "Image.Image", prompt: str, text: str, *,
                        adapter: str | Path | None = None) -> dict[str, float]:
        """E[score] per dimension of the report `text` written for (image, prompt), read from the model's
        score-token probabilities with `adapter` in place (see `scoring.ScoreReader`)."""
        from .scoring import ScoreReader

        with self._lock, self.use_adapter(adapter):
            if self._scores is None:
                self._scores = ScoreReader(self)
            return self._scores.expected(image, prompt, text)

    # -- one photo, several prompts (rag, issue 4) --------------------------------------------------
    def encode(self, image: "Image.Image") -> "EncodedPhoto":
        """Run the vision tower once; pass the result to `generate_json(encoded=...)` for every prompt.

        Its `embedding` (pooled vision features, L2-normalised) is what rag compares photos by.
        """
        from .reuse import encode_photo

        with self._lock:
            return encode_photo(self.model, self.processor, image, self.format_prompt(""))

    def _generate_encoded(self, encoded: "EncodedPhoto", prompt: str, schema: dict, *, max_tokens: int,
                          system: str | None, adapter: str | Path | None,
                          cancel: threading.Event | None = None, deadline: Deadline | None = None) -> Generation:
        from . import reuse

        text_prompt = self.format_prompt(prompt, system=system)
        with self._lock, self.use_adapter(adapter) as key:
            if encoded.kv_key != key:  # a KV cache computed under another adapter cannot be reused
                encoded.kv, encoded.kv_ids = None, None
            started = time.perf_counter()
            out = reuse.generate(self.model, self.processor, self.constraint, encoded, text_prompt, schema,
                                 max_tokens=max_tokens, check=lambda: check_limits(cancel, deadline))
            encoded.kv_key = key
            seconds = time.perf_counter() - started
        return _generation(out, schema, max_tokens, seconds)

    # -- several photos per forward pass (a deep inbox, issue 11 item 7) ---------------------------------
    def generate_json_batch(self, requests: "list[BatchRequest]", *,
                            adapter: str | Path | None = None) -> "list[Generation | Exception]":
        """`generate_json` for each request, in batched forward passes (daemon/model/batch.py), all under one
        `adapter`: the same greedy text each would get alone. Each entry is its request's Generation, or the
        exception `generate_json` would have raised for it (the other rows go on)."""
        from . import batch, reuse

        if len(requests) < 2 or not reuse.supports(self.model):
            return self._one_by_one(requests, [None] * len(requests), adapter)
        prompts: list[str | Exception] = []
        for r in requests:
            try:
                prompts.append(self.format_prompt(r.prompt, system=r.system))
            except PromptTooLong as exc:  # that row's own outcome; the others go on
                prompts.append(exc)
        kept = [(r, p) for r, p in zip(requests, prompts) if isinstance(p, str)]
        if len(kept) < 2:
            return self._one_by_one(requests, [p if isinstance(p, Exception) else None for p in prompts], adapter)
        with self._lock, self.use_adapter(adapter):
            done = iter(batch.generate_batch(self.model, self.processor, self.constraint, [r for r, _ in kept],
                                             [p for _, p in kept], self.format_prompt("")))
        outs = [p if isinstance(p, Exception) else next(done) for p in prompts]
        results: list[Generation | Exception] = []
        for out, request in zip(outs, requests):
            if not isinstance(out, Exception):
                try:
                    out = _generation(out[0], request.schema, request.max_tokens, out[1])
                except GenerationError as exc:
                    out = exc
            results.append(out)
        return results

    def _one_by_one(self, requests: "list[BatchRequest]", settled: "list[Exception | None]",
                    adapter: str | Path | None) -> "list[Generation | Exception]":
        """Each request not `settled` yet, one after another; each is charged its own turn only."""
        share_time((r.deadline for r in requests), 0)
        try:
            return [done or self._alone(r, adapter) for r, done in zip(requests, settled)]
        finally:
            share_time((r.deadline for r in requests), len(requests))

    def _alone(self, request: "BatchRequest", adapter: str | Path | None) -> "Generation | Exception":
        share_time([request.deadline], 1)  # its turn: the others wait, uncharged
        try:
            return self.generate_json(request.image, request.prompt, request.schema, max_tokens=request.max_tokens,
                                      system=request.system, adapter=adapter, encoded=request.encoded,
                                      cancel=request.cancel, deadline=request.deadline)
        except Exception as exc:  # noqa: BLE001 - the row's own outcome, as in a batch
            return exc
        finally:
            share_time([request.deadline], 0)


def _generation(out: "ReuseOutput", schema: dict, max_tokens: int, seconds: float) -> Generation:
    """Our decode loop's output as a Generation, or the GenerationError batch 1 raises for it."""
    from . import reuse

    if not out.finished:
        raise GenerationError(
            f"the model used all {max_tokens} tokens before the JSON closed; raise max_tokens (or lower "
            f"comment_max_chars) in mondrian.toml (got {len(out.text)} chars)", out.text)
    try:
        data = reuse.parse(out.text, schema)
    except (ValueError, jsonschema.ValidationError) as exc:
        raise GenerationError(f"constrained output does not match the schema: {exc}", out.text) from exc
    return Generation(data=data, text=out.text, prompt_tokens=out.prompt_tokens, generated_tokens=len(out.ids),
                      seconds=seconds, reused_tokens=out.reused_tokens, forward_passes=out.forward_passes,
                      free_tokens=out.free_tokens)
