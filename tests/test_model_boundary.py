"""The model runtime's boundary: only daemon/model/ imports MLX, and `Runtime` says what the rest may use."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap

from daemon.model.protocol import Runtime
from daemon.model.runtime import ModelRuntime
from tests.harness import REPO

# Modules that take or describe a runtime without running it: importing them must not import MLX.
LIGHT = ["jobs.train", "jobs.evaluate", "jobs.nightly", "jobs.cli", "jobs.dataset", "daemon.model.protocol",
         "daemon.model.adapter_store", "daemon.model.fitting", "daemon.model.scoring", "daemon.analysis",
         "daemon.analysis.lora", "daemon.analysis.rag", "daemon.pipeline.worker", "daemon.pipeline.supervisor",
         "daemon.cli"]


def test_training_and_the_protocol_import_no_mlx() -> None:
    code = textwrap.dedent(f"""
        import importlib, json, sys
        for name in {LIGHT!r}:
            importlib.import_module(name)
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_vlm"))))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_model_runtime_provides_the_runtime_protocol() -> None:
    fields = set(inspect.get_annotations(Runtime))
    properties = {name for name, value in vars(ModelRuntime).items() if isinstance(value, property)}
    assert fields <= set(inspect.get_annotations(ModelRuntime.__init__)) | properties, \
        "set by ModelRuntime.__init__ or a property of it"
    methods = [name for name, value in vars(Runtime).items() if inspect.isfunction(value) and not name.startswith("_")]
    assert set(methods) >= {"generate_json", "encode", "expected_scores"}
    for name in methods:
        want = inspect.signature(getattr(Runtime, name)).parameters
        have = inspect.signature(getattr(ModelRuntime, name)).parameters
        assert [(p.name, p.kind, p.default) for p in want.values()] == \
               [(p.name, p.kind, p.default) for p in have.values()], name
