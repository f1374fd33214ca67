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


@pytest.fixture(scope="session")
def pg_server():  # type: ignore[no-untyped-def]
    """A real PostgreSQL server for the session (tests/pgserver.py); skipped, saying what to install, without one."""
    from tests.pgserver import PgServer, pg_bin_dir

    pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]' (the postgres extra) for shared-ledger tests")
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (initdb not found): `bash tests/system_deps.sh` installs it")
    server = PgServer(bin_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest) -> str | None:
    """None (the SQLite file) or the URL of a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_server").new_database()


@pytest.fixture(autouse=True)
def _hints_name_no_home_left_by_another_test():
    """`service_action` and the CLI entry points call `hints.serve(home)` in this process: a later test would find
    every hint naming that test's home. Each test starts as a process serving the default home."""
    from daemon import hints

    hints._home_flag = ""
    yield
    hints._home_flag = ""


@pytest.fixture(scope="module")
def smoke_model(smoke_model_path: Path):  # type: ignore[no-untyped-def]
    """The smoke model loaded once per test module (for building adapters against it)."""
    import mlx_vlm

    model, _ = mlx_vlm.load(str(smoke_model_path))
    return model


@pytest.fixture
def async_evals(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[tuple[int, ...], str]]]:
    """Every `mx.async_eval` call while the test runs, as the (shape, dtype) of each array it was given: which
    arrays the decode loop hands MLX together (one event for all of them) and in what order. MLX still runs them."""
    import mlx.core as mx

    calls: list[list[tuple[tuple[int, ...], str]]] = []
    real = mx.async_eval

    def recording(*arrays):  # type: ignore[no-untyped-def]
        flat = [a for x in arrays for a in (x if isinstance(x, (list, tuple)) else [x])]
        calls.append([(tuple(a.shape), str(a.dtype)) for a in flat if isinstance(a, mx.array)])
        return real(*arrays)

    monkeypatch.setattr(mx, "async_eval", recording)
    return calls

