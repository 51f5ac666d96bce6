"""CPU backend: the C++ kernels of `csrc/cpu`, compiled into `firp_engine._C`.

Unavailable (ImportError) until the module is built: `pip install -e . --no-build-isolation`
or `python setup.py build_ext --inplace`. The pybind11 functions take the reference's exact
arguments (keywords included), so they are registered as they are: no Python wrapper sits
between the decode loop and the kernels. They raise on an input they do not support (e.g. a
head dim the attention kernels are not built for), which `Backend.for_model` reads at start-up.
"""

from __future__ import annotations

import torch  # (loaded before _C, which links against it)

from firp_engine import _C  # ImportError here = backend unavailable
from firp_engine.ops import register
from firp_engine.quant import QuantWeight

OPS = (
    "rms_norm",
    "add_rms_norm",
    "rope",
    "silu_mul",
    "linear",
    "write_kv",
    "paged_decode_attention",
    "tree_attention",
    "firp_project",
    "kv_commit",
)

for _name in OPS:
    register(_name, "cpu")(getattr(_C, _name))


@register("pack_linear", "cpu")
def pack_linear(weight: torch.Tensor | QuantWeight) -> torch.Tensor:
    """Dense weights: panels for the bf16/fp32 kernels; GGUF blocks: a self-describing uint8
    pack for the quantized kernel (csrc/cpu/quant.cpp). `linear` tells them apart."""
    if isinstance(weight, QuantWeight):
        return _C.pack_quant(weight.blocks, weight.kind, weight.act)
    return _C.pack_linear(weight)


def layer_stack(model) -> _C.LayerStack:
    """The C++ layer loop over `model`'s weights (csrc/cpu/layers.cpp); the tensors are shared."""
    cfg = model.cfg
    layers = [
        [lw.attn_norm, lw.ffn_norm]
        + [t for lin in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down) for t in lin.kernel_args()]
        for lw in model.layers
    ]
    return _C.LayerStack(
        layers, model.cos, model.sin, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rms_eps, model.scale
    )


# The SIMD path the build compiled in ("avx512bf16", "avx512", "avx2" or "scalar").
ISA: str = _C.cpu_isa
