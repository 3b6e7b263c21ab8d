"""`torch.ops.wq.dequant_matmul`: the quantized matmul as a torch.library custom op.

torch.compile (fullgraph) and CUDA graphs see one opaque op with a fake (meta) implementation
that gives the output shape, instead of tracing into Triton launches, the dispatcher's Python and
its caches. The real implementation calls `dispatch.matmul`, so every device and kernel (reference,
Triton, CPU kernels) is reached the same way with or without compile.

Repacked kernel layouts cannot travel through the op's schema (tensors and scalars only), so they
are cached here per weight tensor: keyed by the qweight object, dropped when it is freed, rebuilt
when qweight/scales/zeros are modified in place (load_state_dict copies into existing buffers).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from ..packing import PackedWeight
from ..scheme import QuantScheme
from . import dispatch

# id(qweight) -> (weakref to qweight, versions of (qweight, scales, zeros), dispatcher cache dict)
_STATE: dict[int, tuple[weakref.ref, tuple[int, int, int], dict]] = {}


def tensor_version(t: Tensor) -> int:
    """In-place edit counter; tensors made under torch.inference_mode() have none (and cannot be edited
    outside it)."""
    return -1 if t.is_inference() else t._version


def _state_cache(qweight: Tensor, scales: Tensor, zeros: Tensor) -> dict:
    key = id(qweight)
    versions = (tensor_version(qweight), tensor_version(scales), tensor_version(zeros))
    hit = _STATE.get(key)
    if hit is not None and hit[0]() is qweight and hit[1] == versions:
        return hit[2]
    cache: dict = {}
    ref = weakref.ref(qweight, lambda _r, key=key: _STATE.pop(key, None))
    _STATE[key] = (ref, versions, cache)
    return cache


def clear_cache() -> None:
    """Drop every cached repacked layout (they are rebuilt on the next call)."""
    _STATE.clear()


@torch.library.custom_op("wq::dequant_matmul", mutates_args=())
def dequant_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor | None,
                   bias: Tensor | None, bits: int, group_size: int, sym: bool, in_features: int) -> Tensor:
    """x [..., in] -> [..., out] = x @ dequant(W)^T + bias, in x's dtype (see PackedWeight for the rest)."""
    scheme = QuantScheme(bits=bits, group_size=group_size, sym=sym)
    pw = PackedWeight(qweight=qweight, scales=scales, zeros=zeros, scheme=scheme, in_features=in_features,
                      out_features=qweight.shape[1], g_idx=g_idx)
    y = dispatch.matmul(x, pw, bias, _state_cache(qweight, scales, zeros))
    # a custom op may not return an input or a view of one (a kernel could return x for an identity)
    return y.clone() if y.data_ptr() == x.data_ptr() else y


@dequant_matmul.register_fake
def _(x, qweight, scales, zeros, g_idx, bias, bits, group_size, sym, in_features):
    torch._check(x.shape[-1] == in_features, lambda: f"x has {x.shape[-1]} features, the weight {in_features}")
    return x.new_empty(*x.shape[:-1], qweight.shape[1])


def _setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, g_idx, bias, bits, group_size, sym, in_features = inputs
    ctx.save_for_backward(qweight, scales, zeros, g_idx)
    ctx.scheme = QuantScheme(bits=bits, group_size=group_size, sym=sym)
    ctx.in_features = in_features
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    """Gradient for x and bias only (the packed weight is not trainable): dx = dy @ W."""
    qweight, scales, zeros, g_idx = ctx.saved_tensors
    pw = PackedWeight(qweight=qweight, scales=scales, zeros=zeros, scheme=ctx.scheme,
                      in_features=ctx.in_features, out_features=qweight.shape[1], g_idx=g_idx)
    dx = grad @ pw.dequantize(torch.float32).to(grad.dtype)  # [..., out] @ [out, in]
    dbias = None if ctx.bias_dtype is None else grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return dx, None, None, None, None, dbias, None, None, None, None


dequant_matmul.register_autograd(_backward, setup_context=_setup_context)


def eager(x: Tensor, bias: Tensor | None) -> bool:
    """True for plain eager inference: no compile, no gradient wanted. The dispatcher is then called
    directly: the custom-op machinery costs more than a small CPU decode GEMV itself (docs/cpu.md)."""
    return not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))


def eager_plan(x: Tensor, pw: PackedWeight):
    """dispatch.plan with the per-weight layout cache: `run(x, bias)` for calls shaped like x."""
    return dispatch.plan(x, pw, _state_cache(pw.qweight, pw.scales, pw.zeros))


def quant_matmul(x: Tensor, pw: PackedWeight, bias: Tensor | None = None) -> Tensor:
    """The PackedWeight front door of the op (eager inference goes straight to the dispatcher)."""
    if eager(x, bias):
        return dispatch.matmul(x, pw, bias, _state_cache(pw.qweight, pw.scales, pw.zeros))
    s = pw.scheme
    return torch.ops.wq.dequant_matmul(x, pw.qweight, pw.scales, pw.zeros, pw.g_idx, bias, s.bits,
                                       s.group_size, s.sym, pw.in_features)
