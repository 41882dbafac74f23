"""Model definitions: one module per architecture (mlx-lm style).

* :mod:`~mlx_moe_kernels.models.qwen2_moe`: Qwen2-MoE (shared expert);
* :mod:`~mlx_moe_kernels.models.qwen3_moe`: Qwen3-MoE;
* :mod:`~mlx_moe_kernels.models.qwen3_vl_moe`: Qwen3-VL-MoE, text only;
* :mod:`~mlx_moe_kernels.models.base`: shared attention, RoPE, MLP, routing
  and the KV cache.

``ARCHITECTURES`` maps a config's ``model_type`` to its module.
"""

from mlx_moe_kernels.models import base, qwen2_moe, qwen3_moe, qwen3_vl_moe

ARCHITECTURES = {
    "qwen2_moe": qwen2_moe,
    "qwen3_moe": qwen3_moe,
    "qwen3_vl_moe": qwen3_vl_moe,
}

__all__ = ["ARCHITECTURES", "base", "qwen2_moe", "qwen3_moe", "qwen3_vl_moe"]
