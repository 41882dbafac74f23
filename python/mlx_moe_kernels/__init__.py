"""Fast Mixture-of-Experts kernels for MLX.

The public API:

* ops, custom MLX primitives with their own CPU kernels: ``gather_mm``
  (top-k expert dispatch), ``gather_qmm`` (the same on ``mx.quantize``
  weights), ``switch_glu`` (a fused SwitchGLU with the
  optional score-weighted combine), ``route`` (token slots grouped by
  expert), and the dense projections ``linear`` / ``quantized_linear``
  (``x @ W.T`` on the same kernels over a single matrix), and
  ``scaled_dot_product_attention`` (a flash-style CPU attention kernel)
  ``rope``, ``rms_norm`` and ``softmax_top_k`` (a router's expert
  choice; one CPU kernel each);
* ``dense``: ``Linear``, ``QuantizedLinear``, ``Embedding``,
  ``QuantizedEmbedding``, MLX's layers computing on those ops (our models
  use them for the attention, router, shared expert and lm_head);
* layers, drop-in for mlx-lm's: ``SwitchLinear``, ``QuantizedSwitchLinear``
  (what ``nn.quantize`` makes of a ``SwitchLinear``), ``SwitchGLU``,
  ``SwitchMLP`` (and the ``SwiGLU`` activation);
* ``patch`` / ``unpatch``: swap mlx-lm's ``SwitchGLU`` layers in a loaded
  model (float, or quantized in affine or mxfp4 mode) for ours, in place;
* ``reference``: every op in plain MLX, the oracle of the tests;
* ``models``: Qwen2-MoE, Qwen3-MoE and Qwen3-VL-MoE (text) definitions on
  our layers; ``load_model`` reads a local Hugging Face checkpoint folder
  (float or MLX-quantized) into them, ``quantize_model`` quantizes a loaded
  model as ``mlx_lm.convert -q`` does; ``stream_generate`` /
  ``load_tokenizer`` generate text (see :mod:`mlx_moe_kernels.generate`);
* ``use_huge_pages``: back loaded weights with transparent huge pages
  (Linux), which decode reads faster (see :mod:`mlx_moe_kernels.memory`).
"""

from mlx_moe_kernels.ops import (
    gather_mm,
    gather_qmm,
    linear,
    quantized_linear,
    rms_norm,
    rope,
    route,
    scaled_dot_product_attention,
    softmax_top_k,
    switch_glu,
)
from mlx_moe_kernels import dense
from mlx_moe_kernels.layers import QuantizedSwitchLinear, SwiGLU, SwitchGLU, SwitchLinear, SwitchMLP
from mlx_moe_kernels.patch import patch, unpatch
from mlx_moe_kernels import reference
from mlx_moe_kernels import models
from mlx_moe_kernels.loading import load_model, quantize_model
from mlx_moe_kernels.generate import load_tokenizer, stream_generate
from mlx_moe_kernels.memory import use_huge_pages

__all__ = [
    "gather_mm",
    "gather_qmm",
    "switch_glu",
    "route",
    "linear",
    "quantized_linear",
    "scaled_dot_product_attention",
    "rope",
    "rms_norm",
    "softmax_top_k",
    "dense",
    "SwiGLU",
    "SwitchLinear",
    "QuantizedSwitchLinear",
    "SwitchGLU",
    "SwitchMLP",
    "patch",
    "unpatch",
    "reference",
    "models",
    "load_model",
    "quantize_model",
    "load_tokenizer",
    "stream_generate",
    "use_huge_pages",
]
__version__ = "0.1.0"
