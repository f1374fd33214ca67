"""What the rest of Mondrian may ask of a loaded model: the `Runtime` protocol.

`daemon.model.runtime.ModelRuntime` is the implementation. Strategies, the reference indexer, the worker and
the training jobs are typed against this protocol, so importing them never imports MLX (this module
imports nothing heavy; the types it names are only imported for type checkers).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from PIL import Image

    from ..limits import Deadline
    from .reuse import EncodedPhoto
    from .runtime import Generation


@dataclass
class BatchRequest:
    """One photo of `Runtime.generate_json_batch`: what `generate_json` takes for one photo."""

    image: "Image.Image"
    prompt: str
    schema: dict
    max_tokens: int
    system: str | None = None
    cancel: threading.Event | None = None
    deadline: Deadline | None = None  # a time.monotonic() value, or its share of a batch's time (limits.py)
    encoded: "EncodedPhoto | None" = None  # from `encode(image)`: the vision tower is not run again


class Runtime(Protocol):
    model_id: str  # what reports and the reference index name the model by
    path: str  # the checkpoint folder
    is_smoke: bool  # the offline smoke model (random weights): its scores mean nothing
    max_pixels: int
    suggested_batch_size: int  # photos a forward pass on this device when `batch_size` is 0 (auto)

    def generate_json(self, image: "Image.Image", prompt: str, schema: dict, *, max_tokens: int,
                      system: str | None = None, adapter: str | Path | None = None,
                      encoded: "EncodedPhoto | None" = None, cancel: threading.Event | None = None,
                      deadline: Deadline | None = None) -> "Generation": ...

    def generate_json_batch(self, requests: list[BatchRequest], *,
                            adapter: str | Path | None = None) -> "list[Generation | Exception]": ...

    def encode(self, image: "Image.Image") -> "EncodedPhoto": ...

    def expected_scores(self, image: "Image.Image", prompt: str, text: str, *,
                        adapter: str | Path | None = None) -> dict[str, float]: ...
