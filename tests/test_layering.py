"""The two layering rules of ARCHITECTURE.md, read from the imports of every module (ast: nothing is imported).

1. Only daemon/model/ imports mlx or mlx_vlm: the rest of Mondrian never touches MLX (not thread-safe, heavy to
   import, the one part that changes with the machine).
2. daemon/ never imports jobs/ (inference does not depend on training), except through the entry points named
   in ALLOWED_JOBS_IMPORTS, each imported explicitly where it is used.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The product. bench/ (and tests/mlx_reference.py) measure Mondrian against plain mlx_vlm on purpose: not checked.
PACKAGES = ("daemon", "jobs")

# daemon/ -> jobs/: the supervisor's scheduling entry point (nightly training), the CLI's training commands,
# `mondrian demo`, which trains its adapter with the training side's own code and progress display, and `mondrian
# init`, whose mondrian.toml shows the [lora] defaults the training side's TrainSettings holds.
ALLOWED_JOBS_IMPORTS = {
    ("daemon/pipeline/supervisor.py", "jobs.nightly"),
    ("daemon/cli/main.py", "jobs.cli"),
    ("daemon/cli/demo.py", "jobs.cli"),
    ("daemon/cli/demo.py", "jobs.train"),
    ("daemon/cli/init.py", "jobs.train"),
}


def _modules(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (REPO / pkg).rglob("*.py"))


def _package(path: Path) -> list[str]:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    return parts if parts[-1] == "__init__" and parts.pop() is not None else parts[:-1]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`, at any depth (lazy imports inside functions too);
    relative imports resolved against the module's own package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(path)[: len(_package(path)) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]  # `from x import sub`
    return found


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_imports_are_read() -> None:
    """The reader sees lazy, relative and `from . import` imports (else the rules below would prove nothing)."""
    worker = imports(REPO / "daemon/pipeline/worker.py")
    assert any(m == "daemon.analysis" for _, m in worker)  # from ..analysis import ...
    assert any(m == "daemon.intake.inbox" for _, m in worker)
    supervisor = imports(REPO / "daemon/pipeline/supervisor.py")
    assert any(m == "jobs.nightly" for _, m in supervisor)  # inside a method
    runtime = imports(REPO / "daemon/model/runtime.py")
    assert any(_top(m) == "mlx_vlm" for _, m in runtime)


def test_daemon_never_imports_jobs_except_the_entry_points() -> None:
    offenders = [f"{_rel(p)}:{line}: imports {m}" for p in _modules("daemon") for line, m in imports(p)
                 if _top(m) == "jobs" and (_rel(p), m) not in ALLOWED_JOBS_IMPORTS
                 and not any(m.startswith(f"{allowed}.") for where, allowed in ALLOWED_JOBS_IMPORTS
                             if where == _rel(p))]
    assert offenders == []


def test_no_dynamic_imports_in_daemon() -> None:
    """`__import__` / `importlib.import_module` would hide an import from the rules (and the old CLI used one to
    drop a broken command group silently)."""
    offenders = []
    for path in _modules("daemon"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if name in ("__import__", "import_module"):
                    offenders.append(f"{_rel(path)}:{node.lineno}: {name}()")
    assert offenders == []


def test_only_the_model_room_imports_mlx() -> None:
    """jobs/ fits and scores through daemon/model/ (fitting.py, scoring.py) and never imports MLX itself."""
    offenders = [f"{_rel(p)}:{line}: imports {m}" for p in _modules(*PACKAGES) for line, m in imports(p)
                 if _top(m) in ("mlx", "mlx_vlm") and not _rel(p).startswith("daemon/model/")]
    assert offenders == []


def test_the_api_reaches_the_daemon_only_through_the_ledger() -> None:
    """daemon/api/ runs on the server's threads: it never touches MLX or the model room (one MLX thread), nor the
    database except through daemon/ledger.py, nor the worker's internals (it queues jobs; the worker runs them)."""
    banned = ("mlx", "mlx_vlm", "daemon.model", "sqlite3", "peewee", "daemon.pipeline", "jobs")
    offenders = [f"{_rel(p)}:{line}: imports {m}" for p in sorted((REPO / "daemon" / "api").rglob("*.py"))
                 for line, m in imports(p) if any(m == b or m.startswith(f"{b}.") for b in banned)]
    assert offenders == []
