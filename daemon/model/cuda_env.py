"""MLX CUDA backend switches that must be in the environment before the first kernel runs.

Only the CUDA backend reads these (Metal and CPU ignore them); a value the user exported wins.

`MLX_CUDA_USE_CUDNN_SDPA=0`: MLX 0.32 runs attention over more than one query token through cuDNN, whose graph
is built once per (query length, key length). Fast-forwarding schema-forced tokens (daemon/model/reuse.py) runs
such a pass at a new context length every time, so each one paid a fresh graph build: on an H200 with the real
Qwen2-VL-2B shapes (bf16), a 4-token pass took 52.9 ms at an unseen length against 9.3 ms at a seen one, and with
cuDNN attention off 14.0 ms either way (`python -m bench decode_step --size real`). The one-token decode step got
faster too (6.4 ms against 7.8 ms), and a critique's single pass went from 0.945x to 0.811x of
`mlx_vlm.generate`'s time (bench/RESULTS.md). MLX reads the variable once, at its first attention.
"""

from __future__ import annotations

import os

DEFAULTS = {"MLX_CUDA_USE_CUDNN_SDPA": "0"}


def apply_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
