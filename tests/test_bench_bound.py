"""`python -m bench bound` counts FLOPs from config.json; here the count is checked against the checkpoint's own tensor
shapes (a matrix-multiply with a [out, in] weight costs 2·out·in per row), so a wrong head count, kv width or MLP
width in the formula shows. No timing here: the bound's rates are measured by the benchmark itself."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from bench.bound import language_flops, vision_flops


def _shapes(model: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(model / "model.safetensors"), "numpy") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def _matrix_sizes(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    total = 0
    for name, shape in shapes.items():
        if name.startswith(prefix) and name.endswith(".weight") and len(shape) >= 2:
            size = 1
            for dim in shape:
                size *= dim
            total += size
    return total


def test_language_flops_match_the_checkpoint(smoke_model_path: Path) -> None:
    cfg = json.loads((smoke_model_path / "config.json").read_text())
    shapes = _shapes(smoke_model_path)
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    linear = _matrix_sizes(shapes, "language_model.model.layers.")
    head = _matrix_sizes(shapes, "language_model.lm_head")
    for tokens, context in ((1, 0), (7, 0), (5, 11)):
        attended = tokens * context + tokens * (tokens + 1) / 2
        expected = 2 * tokens * linear + layers * 4 * hidden * attended + 2 * head
        assert language_flops(cfg, tokens, context=context) == expected, (tokens, context)


def test_vision_flops_match_the_checkpoint(smoke_model_path: Path) -> None:
    cfg = json.loads((smoke_model_path / "config.json").read_text())
    shapes = _shapes(smoke_model_path)
    v = cfg["vision_config"]
    for grid in ((1, 2, 2), (1, 4, 6)):
        n = grid[0] * grid[1] * grid[2]
        merged = n // v["spatial_merge_size"] ** 2
        expected = (2 * n * _matrix_sizes(shapes, "vision_tower.patch_embed.")
                    + 2 * n * _matrix_sizes(shapes, "vision_tower.blocks.")
                    + v["depth"] * 4 * n * n * v["embed_dim"]
                    + 2 * merged * _matrix_sizes(shapes, "vision_tower.merger."))
        assert vision_flops(cfg, grid) == expected, grid


def test_the_counted_graph_is_one_whole_pass(smoke_model) -> None:  # type: ignore[no-untyped-def]
    """`bound` times a dispatch floor of as many kernels as a decode pass has: the graph counted must be one pass
    through every layer (each writes its keys and values once) and one pick of the next token, not a part of it
    nor two."""
    from bench.decode_step import VIEW_PRIMITIVES, kernels, pass_operations

    lm = smoke_model.language_model
    operations = pass_operations(lm, context=24)
    assert operations["SliceUpdate"] == 2 * len(lm.model.layers)
    assert operations["ArgReduce"] == 1
    views = sum(n for name, n in operations.items() if name in VIEW_PRIMITIVES)
    assert 0 < kernels(operations) == sum(operations.values()) - views
