"""The model runtime: the only package in Mondrian that touches MLX.

Import `daemon.model.runtime` (not mlx) from the rest of the daemon. OpenBLAS is preloaded here, at
package import, because it only helps if it is in the process before mlx is first imported.
"""

from . import blas

blas.preload_openblas()
