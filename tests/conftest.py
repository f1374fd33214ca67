"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach a model hub; this must be set before huggingface_hub is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smoke_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline smoke Qwen2-VL checkpoint, built once per session (~2 s).

    It lives at <var_dir>/models/smoke-qwen2-vl, so `ModelRuntime.load("smoke", var_dir=path.parents[1])`
    and `ModelRuntime.load(str(path), ...)` both find it without rebuilding.
    """
    from daemon.model.smoke import ensure_smoke_model

    return ensure_smoke_model(tmp_path_factory.mktemp("smoke_var"))


@pytest.fixture(scope="session")
def plain_model_path(smoke_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke architecture and tokenizer with plain random weights (~1 s to build).

    Compare two generation paths on this one, not on the smoke model: the smoke model damps every layer (its
    next token depends mostly on the current one, so wrong positions or a stale KV cache go unseen) and gives
    all ten digits one output row (their logits tie exactly, so a last-bit rounding difference between two
    BLAS kernels flips a score). Here every token has its own row and the output depends on the context.
    """
    from tests.lora_helpers import plain_random_model

    return plain_random_model(smoke_model_path, tmp_path_factory.mktemp("plain") / "smoke-plain")
