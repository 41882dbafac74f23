"""Fast Mixture-of-Experts kernels for MLX.

The public API: gather matmul for top-k expert dispatch as a custom MLX
primitive with its own CPU kernel, and its plain-MLX reference
(``mlx_moe_kernels.reference``).
"""

from mlx_moe_kernels.ops import gather_mm
from mlx_moe_kernels import reference

__all__ = ["gather_mm", "reference"]
__version__ = "0.1.0"
