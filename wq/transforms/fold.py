"""Pure per-module edits that leave the model's function unchanged when applied in matching pairs.

Row-vector convention: a Linear computes y = x W^T + b with W [out, in]. For an orthogonal Q and a
residual stream rotated as h' = h Q:
    a reader (input from the stream)  W' = W Q                 (x' W'^T = x Q Q^T W^T = x W^T)
    a writer (output into the stream) W' = Q^T W,  b' = b Q    (y' = y Q)
    the embedding [vocab, hidden]     E' = E Q
A norm's per-channel scale g folds into its readers, W' = W diag(g), g' = 1 (RMSNorm(x) = g * x / rms(x),
and rms is rotation invariant, so once g = 1 the norm commutes with Q). For a per-channel scaling s of
a norm's output (AWQ): g' = g / s (and b' = b / s), readers W' = W diag(s).
All math in float64, cast back to each parameter's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .weights import linear_weight, set_linear_weight


def _gemma_like(norm: nn.Module) -> bool:
    return "Gemma" in type(norm).__name__  # Gemma's RMSNorm scales by (1 + weight)


def norm_scale(norm: nn.Module) -> Tensor:
    """The per-channel multiplier the norm applies, float64 [hidden]."""
    w = norm.weight.detach().double()
    return 1.0 + w if _gemma_like(norm) else w


@torch.no_grad()
def set_norm_scale_(norm: nn.Module, g: Tensor) -> None:
    norm.weight.copy_((g - 1.0 if _gemma_like(norm) else g).to(norm.weight.dtype))


@torch.no_grad()
def fold_norm_(norm: nn.Module, readers: list[nn.Module]) -> None:
    """Move the norm's scale (and bias, if any) into the Linears that read its output; the norm becomes
    the identity scale (and zero bias)."""
    g = norm_scale(norm)
    b = getattr(norm, "bias", None)
    for lin in readers:
        w = linear_weight(lin).detach().double()  # [out, in]
        if b is not None:
            shift = w @ b.detach().double()  # [out]: W (g n + b) = (W diag g) n + W b
            if lin.bias is None:
                raise ValueError("folding a norm bias into a Linear without bias is not supported")
            lin.bias.copy_((lin.bias.double() + shift).to(lin.bias.dtype))
        set_linear_weight(lin, w * g[None, :])
    set_norm_scale_(norm, torch.ones_like(g))
    if b is not None:
        b.zero_()


@torch.no_grad()
def scale_norm_(norm: nn.Module, s: Tensor) -> None:
    """Multiply the norm's output by s per channel (its scale and bias)."""
    s = s.double()
    set_norm_scale_(norm, norm_scale(norm) * s)
    b = getattr(norm, "bias", None)
    if b is not None:
        b.copy_((b.double() * s).to(b.dtype))


@torch.no_grad()
def scale_inputs_(lin: nn.Module, s: Tensor) -> None:
    """W' = W diag(s): the Linear now expects inputs divided by s."""
    set_linear_weight(lin, linear_weight(lin).detach().double() * s.double()[None, :])


@torch.no_grad()
def scale_outputs_(lin: nn.Module, s: Tensor) -> None:
    """W' = diag(s) W, b' = s b: the Linear's outputs multiplied by s."""
    set_linear_weight(lin, linear_weight(lin).detach().double() * s.double()[:, None])
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() * s.double()).to(lin.bias.dtype))


@torch.no_grad()
def rotate_inputs_(lin: nn.Module, Q: Tensor) -> None:
    """Reader: W' = W Q."""
    set_linear_weight(lin, linear_weight(lin).detach().double() @ Q.double())


@torch.no_grad()
def rotate_outputs_(lin: nn.Module, Q: Tensor) -> None:
    """Writer: W' = Q^T W, b' = b Q."""
    Q = Q.double()
    set_linear_weight(lin, Q.t() @ linear_weight(lin).detach().double())
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() @ Q).to(lin.bias.dtype))


@torch.no_grad()
def rotate_embedding_(emb: nn.Module, Q: Tensor) -> None:
    """E' = E Q for an embedding table [vocab, hidden]."""
    emb.weight.copy_((emb.weight.detach().double() @ Q.double()).to(emb.weight.dtype))
