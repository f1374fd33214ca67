"""Fit a LoRA adapter on the loaded base model with mlx-vlm's trainer (the training child calls this).

LoRA is attached to the language model (rank 8, alpha 16 by default), trained on completion tokens only (each
score digit against a Gaussian over the digits around the advisor's score: daemon.model.ordinal),
validation loss is evaluated every few steps, and training stops early when it stops improving; the model
is left holding the best weights seen, in eval mode, so the caller can evaluate it in place. Progress is
reported through a callback (the trainer's own prints go to stderr, never to stdout).

Before the first step every training and validation sample is checked as the trainer will see it: it must
carry its image tokens (as many as its image grid gives) and fit in `max_seq_length`. mlx-vlm before 0.5.0
dropped the images of Qwen samples (about 23 tokens a sample instead of hundreds), and a sample longer than
the limit is skipped or truncated with only a warning: either would train an adapter that never saw photos.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .ordinal import ordinal_loss, score_tokens

if TYPE_CHECKING:
    from .runtime import ModelRuntime

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class FitSettings:
    steps: int
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    learning_rate: float = 1e-4
    batch_size: int = 1
    eval_every: int = 0  # 0: about ten validation evaluations per run
    patience: int = 3  # evaluations without improvement before stopping early
    max_seq_length: int = 8192
    seed: int = 0
    score_sigma: float = 1.0  # score digits are taught as a Gaussian of this std around the score; 0: one-hot


@dataclass
class FitResult:
    """What one fit produced: its history and numbers (`metrics`), and the best adapter, ready to save."""

    metrics: dict[str, Any]
    adapter_config: dict[str, Any]
    weights: dict[str, Any]  # LoRA parameter name -> mx.array

    def save(self, folder: Path) -> Path:
        """Write the adapter folder (adapter_config.json + adapters.safetensors), fsynced."""
        from .adapters import save_adapter

        return save_adapter(folder, self.adapter_config, self.weights)


class _EarlyStop(Exception):
    pass


class SampleError(RuntimeError):
    """A training sample would not train what it should (no image tokens, too long); the message says which."""


def _image_token_id(model: Any) -> int:
    config = model.config
    for source in (config, getattr(config, "text_config", None)):
        for name in ("image_token_id", "image_token_index"):
            value = getattr(source, name, None)
            if isinstance(value, int):
                return value
    raise SampleError("the model's config names no image token (image_token_id): cannot check the samples")


def check_samples(dataset: Any, *, image_token_id: int, max_seq_length: int, merge: int = 2,
                  split: str = "train") -> dict[str, int]:
    """Count each prepared sample's image tokens; raise SampleError unless every sample has all of them and
    fits in `max_seq_length`. Returns the counts (for the metrics)."""
    import numpy as np

    counts, lengths = [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        ids = np.asarray(sample["input_ids"]).reshape(-1)
        n_image = int(np.count_nonzero(ids == image_token_id))
        grid = sample.get("image_grid_thw")
        expected = int(np.prod(np.asarray(grid), axis=-1).sum()) // (merge * merge) if grid is not None else None
        if n_image == 0 or sample.get("pixel_values") is None:
            raise SampleError(f"{split} sample {i} carries no image tokens ({len(ids)} tokens in all): the photo "
                              f"was dropped before training; nothing would be learned from it")
        if expected is not None and n_image != expected:
            raise SampleError(f"{split} sample {i} carries {n_image} image tokens, but its image needs {expected}")
        if len(ids) > max_seq_length:
            raise SampleError(f"{split} sample {i} has {len(ids)} tokens, more than max_seq_length "
                              f"{max_seq_length}: the trainer would skip or cut it; raise [lora] "
                              f"max_seq_length or lower max_pixels")
        counts.append(n_image)
        lengths.append(len(ids))
    if not counts:
        raise SampleError(f"the {split} split has no samples")
    return {f"{split}_samples": len(counts), f"{split}_image_tokens_min": min(counts),
            f"{split}_image_tokens_max": max(counts), f"{split}_tokens_max": max(lengths)}


def _at_least(rows: Any, n: int) -> Any:
    """`rows` (a datasets.Dataset or a list), its rows repeated in turn until there are at least `n`."""
    if not len(rows) or len(rows) >= n:
        return rows
    order = [i % len(rows) for i in range(n)]
    return rows.select(order) if hasattr(rows, "select") else [rows[i] for i in order]


def fit_lora(runtime: "ModelRuntime", train: Any, validation: Any, settings: FitSettings, *, scratch: Path,
             on_progress: Progress) -> FitResult:
    """Train LoRA layers on `runtime.model` over `train` rows (mlx-vlm's row format), early-stopped on `validation`.

    `scratch` is a file the trainer may write its periodic checkpoints to; it is removed afterwards.
    """
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_vlm.trainer import Trainer, TrainingCallback, VLMTrainingArgs, prepare_model_for_training

    steps = settings.steps
    model = runtime.model
    mx.random.seed(settings.seed)
    # mlx-vlm refuses a split smaller than one batch; a small portfolio's validation split (one photo) repeats
    # its rows up to a batch, which leaves the mean loss as it is.
    train, validation = _at_least(train, settings.batch_size), _at_least(validation, settings.batch_size)
    prepare_model_for_training(model, train_type="lora", lora_rank=settings.rank, lora_alpha=settings.alpha,
                               lora_dropout=settings.dropout, verbose=False)
    eval_every = settings.eval_every or max(5, steps // 10)
    report_every = max(1, min(10, eval_every))
    args = VLMTrainingArgs(
        batch_size=settings.batch_size, iters=steps, val_batches=-1, steps_per_report=report_every,
        steps_per_eval=eval_every, steps_per_save=steps + 1, adapter_file=str(scratch),
        max_seq_length=settings.max_seq_length, train_on_completions=True,
        cache_size=min(len(train) + len(validation), 256))

    state: dict[str, Any] = {"best": None, "best_step": 0, "best_weights": None, "bad": 0, "history": [],
                             "last_loss": None, "started": time.time()}

    def snapshot() -> dict[str, Any]:
        return dict(tree_flatten(model.trainable_parameters()))

    class Callback(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            state["last_loss"] = float(info.get("train_loss", float("nan")))
            step = int(info.get("iteration", 0))
            elapsed = time.time() - state["started"]
            on_progress(dict(event="progress", phase="training", step=step, steps=steps,
                             loss=round(state["last_loss"], 4),
                             best_val_loss=None if state["best"] is None else round(state["best"], 4),
                             elapsed_s=round(elapsed, 1), eta_s=round(elapsed / max(step, 1) * (steps - step), 1)))

        def on_val_loss_report(self, info: dict) -> None:
            val = float(info.get("val_loss", float("nan")))
            step = int(info.get("iteration", 0))
            state["history"].append({"step": step, "val_loss": round(val, 5), "train_loss": state["last_loss"]})
            if state["best"] is None or val < state["best"] - 1e-4:
                state.update(best=val, best_step=step, best_weights=snapshot(), bad=0)
            else:
                state["bad"] += 1
            on_progress(dict(event="progress", phase="training", step=step, steps=steps, loss=state["last_loss"],
                             val_loss=round(val, 4), best_val_loss=round(state["best"], 4)))
            if state["bad"] >= settings.patience:
                raise _EarlyStop()

    trainer = Trainer(model, args, train_dataset=train, eval_dataset=validation,
                      processing_class=runtime.processor, optimizer=optim.Adam(learning_rate=settings.learning_rate),
                      training_callback=Callback(), seed=settings.seed)
    merge = int(getattr(getattr(model.config, "vision_config", None), "spatial_merge_size", 2) or 2)
    samples: dict[str, int] = {}
    for name, data in (("train", trainer.train_dataset), ("validation", trainer.eval_dataset)):
        samples.update(check_samples(data, image_token_id=_image_token_id(model), max_seq_length=settings.max_seq_length,
                                     merge=merge, split=name))
    on_progress(dict(event="phase", phase="samples checked", **samples))
    objective = ordinal_loss(score_tokens(runtime.tokenizer), settings.score_sigma) if settings.score_sigma > 0 \
        else nullcontext()
    with objective:  # validation loss (early stopping, best checkpoint) measures what training minimises
        initial = trainer.evaluate()["val_loss"]
        state["history"].append({"step": 0, "val_loss": round(float(initial), 5), "train_loss": None})
        on_progress(dict(event="phase", phase="training", steps=steps, val_loss=round(float(initial), 4)))
        state["started"] = time.time()
        stopped_early = False
        out = sys.stdout
        sys.stdout = sys.stderr  # the trainer prints progress; keep stdout clean for whoever reads it
        try:
            trainer.train()
        except _EarlyStop:
            stopped_early = True
        finally:
            sys.stdout = out
    if state["best_weights"] is None:
        state.update(best=float(initial), best_weights=snapshot(), best_step=0)
    model.load_weights(list(state["best_weights"].items()), strict=False)
    model.eval()
    Path(scratch).unlink(missing_ok=True)
    metrics = {"steps_planned": steps, "steps_run": state["history"][-1]["step"], "best_step": state["best_step"],
               "best_val_loss": round(float(state["best"]), 5), "initial_val_loss": round(float(initial), 5),
               "last_train_loss": state["last_loss"], "stopped_early": stopped_early, "history": state["history"],
               "train_rows": len(train), "validation_rows": len(validation), "samples": samples,
               "learning_rate": settings.learning_rate, "batch_size": settings.batch_size, "rank": settings.rank,
               "alpha": settings.alpha,
               "score_sigma": settings.score_sigma,
               "train_seconds": round(time.time() - state["started"], 2)}
    # prepare_model_for_training records the layers' shape (and the base quantization) on the model
    config = json.loads(json.dumps(model._vlm_adapter_config))
    return FitResult(metrics=metrics, adapter_config=config, weights=state["best_weights"])
