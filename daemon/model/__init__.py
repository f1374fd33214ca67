"""The model runtime: the only package in Mondrian that touches MLX.

- runtime.py: `ModelRuntime` (load, schema-constrained generation, encode-once, adapter swap, score reading);
  protocol.py: `Runtime`, what the rest of Mondrian may use of it (typing only, imports no MLX).
- constrained.py, reuse.py: decoding; adapters.py: LoRA layers swapped per photo; scoring.py: expected scores;
  fitting.py: LoRA training (called by jobs/train.py's child process); smoke.py: the offline smoke model.
- adapter_store.py: adapter versions on disk, `current`, rollback, and the base-model fingerprint (no MLX).
- text_rope.py, fused_proj.py, flat_step.py: fewer kernels and less Python a decode step where a step is host
  work (a GPU): one fused RoPE, stacked projections, the one-token pass written against the weights.

Import `daemon.model.runtime` (not mlx) from the rest of the daemon. OpenBLAS is preloaded here, at
package import, because it only helps if it is in the process before mlx is first imported.
"""

from . import blas

blas.preload_openblas()
