"""Replaying a calibration batch one sample at a time.

A block's forward over a batch of B samples holds B samples' activations at once: for a hidden-2048
Llama block and 4 x 256 tokens the MLP's [B, T, intermediate] fp32 intermediates are ~130 MiB of the
Hessian pass's peak, more than the Hessians of q..up together. Statistics that are sums over tokens
(Hessians) do not need the batch together, so the Hessian pass replays each batch sample by sample:
the same tokens, the same sums (in another order of addition), 1/B of the activations.

A batch's kwargs are sliced where they are per sample: tensors of two or more dimensions whose first
dimension is the batch's (attention masks [B, 1, T, T], position ids [B, T], rotary tables [B, T, d]).
Tensors whose first dimension is 1 broadcast over the batch and are passed as they are, and so are
one-dimensional tensors (cache_position [T]) and plain values. Anything else (a tensor whose first
dimension is neither, such as Bloom's alibi [B * heads, 1, T], or an object that may hold the batch
inside, e.g. a flex-attention BlockMask) is not split: the batch is replayed whole.
"""

from __future__ import annotations

from torch import Tensor

_PLAIN = (bool, int, float, str, type(None))


def per_sample(hidden: Tensor, kwargs: dict) -> list[tuple[Tensor, dict]]:
    """[(hidden[i:i+1], kwargs of sample i)] for a batch `hidden` [B, T, d]; [(hidden, kwargs)] when B is 1
    or a kwarg cannot be split safely."""
    b = hidden.shape[0]
    if b == 1 or not _splittable(kwargs, b):
        return [(hidden, kwargs)]
    return [(hidden[i:i + 1], _slice(kwargs, b, i)) for i in range(b)]


def _splittable(obj, b: int) -> bool:
    if isinstance(obj, Tensor):  # e.g. Bloom's alibi [B * heads, 1, T]: per sample, but not along dim 0 alone
        return obj.dim() < 2 or obj.shape[0] in (1, b)
    if isinstance(obj, _PLAIN):
        return True
    if isinstance(obj, (tuple, list)):
        return all(_splittable(v, b) for v in obj)
    if isinstance(obj, dict):
        return all(_splittable(v, b) for v in obj.values())
    return False


def _slice(obj, b: int, i: int):
    if isinstance(obj, Tensor):
        return obj[i:i + 1] if obj.dim() >= 2 and obj.shape[0] == b else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_slice(v, b, i) for v in obj)
    if isinstance(obj, dict):
        return {k: _slice(v, b, i) for k, v in obj.items()}
    return obj
