"""Fit a LoRA adapter on the loaded base model with mlx-vlm's trainer (the training child calls this).

LoRA is attached to the language model (rank 8, alpha 16 by default), trained on completion tokens only,
held-out loss is evaluated every few steps, and training stops early when it stops improving; the model
is left holding the best weights seen, in eval mode, so the caller can evaluate it in place. Progress is
reported through a callback (the trainer's own prints go to stderr, never to stdout).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

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
    eval_every: int = 0  # 0: about ten held-out evaluations per run
    patience: int = 3  # evaluations without improvement before stopping early
    max_seq_length: int = 8192
    seed: int = 0


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
               "train_rows": len(train), "held_out_rows": len(validation),
               "learning_rate": settings.learning_rate, "rank": settings.rank, "alpha": settings.alpha,
               "train_seconds": round(time.time() - state["started"], 2)}
    # prepare_model_for_training records the layers' shape (and the base quantization) on the model
    config = json.loads(json.dumps(model._vlm_adapter_config))
    return FitResult(metrics=metrics, adapter_config=config, weights=state["best_weights"])
