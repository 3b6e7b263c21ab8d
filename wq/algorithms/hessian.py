"""Input statistics of a block's Linears: the Hessians H = 2/n sum x^T x that gptq, awq and recon use.

Pure in the sense that matters: the block's weights are not touched; only forward hooks observe it.
Under torchrun every rank sums its own samples and the sums (and token counts) are all-reduced, so
every rank ends with the same H as one process over all samples.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..calib.distributed import all_reduce_sum_, rank_world
from ..transforms.weights import is_transposed

# kwargs a decoder block gets during a full-model forward that make no sense when replaying it
DROP_KWARGS = ("past_key_values", "past_key_value", "use_cache", "cache_position", "output_attentions")


def replay_kwargs(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k not in DROP_KWARGS}


@torch.no_grad()
def block_hessians(block: nn.Module, names: list[str], inputs: list[Tensor], kwargs: list[dict]) -> dict[str, Tensor]:
    """{name: H [in, in] fp32} over every token row that reached each named Linear in `block`.

    Linears fed the same tensor (q/k/v, gate/up) share one H object: never modify it in place.
    A Linear that saw no token on any rank (an MoE expert nobody routed to) gets H = 0.
    """
    dev = next(block.parameters()).device
    acc: dict[str, Tensor] = {}
    count: dict[str, float] = {}
    alias: dict[str, str] = {}
    # input identity within one batch -> (the first Linear that saw it, the input itself: holding it keeps
    # its address from being reused by a later tensor of the same shape, which would alias falsely)
    seen: dict[tuple, tuple[str, Tensor]] = {}

    def make_hook(rel: str):
        def hook(module, args, out):
            inp = args[0]
            key = (inp.data_ptr(), tuple(inp.shape), inp._version)
            owner = seen.setdefault(key, (rel, inp))[0]
            alias.setdefault(rel, owner)
            if owner != rel:
                return
            x = inp.detach().reshape(-1, inp.shape[-1]).float()  # [tokens, in]
            if rel not in acc:
                acc[rel] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                count[rel] = 0.0
            acc[rel].addmm_(x.t(), x)
            count[rel] += x.shape[0]
        return hook

    handles = [block.get_submodule(n).register_forward_hook(make_hook(n)) for n in names]
    try:
        for x, kw in zip(inputs, kwargs):
            seen.clear()
            block(x.to(dev, torch.float32), **replay_kwargs(kw))
    finally:
        for h in handles:
            h.remove()
    owner_of = _agree_on_owners(names, alias)
    out: dict[str, Tensor] = {}
    done: dict[str, Tensor] = {}
    for n in names:
        owner = owner_of[n]
        if owner not in done:
            mod = block.get_submodule(owner)
            in_f = mod.weight.shape[0] if is_transposed(mod) else mod.weight.shape[1]
            H = acc.get(owner)
            H = torch.zeros(in_f, in_f, device=dev) if H is None else H
            c = torch.tensor([count.get(owner, 0.0)], dtype=torch.float64, device=H.device)
            all_reduce_sum_(H)
            all_reduce_sum_(c)
            done[owner] = H.mul_(2.0 / max(float(c), 1.0))
        out[n] = done[owner]
    return out


def _agree_on_owners(names: list[str], alias: dict[str, str]) -> dict[str, str]:
    """Which Linear's accumulator holds each name's input, the same on every rank (a rank that routed no
    token to an expert has no alias for it: it takes the other ranks' view, so the collectives match)."""
    idx = torch.tensor([names.index(alias[n]) if n in alias else -1 for n in names], dtype=torch.int64)
    if rank_world()[1] > 1:
        torch.distributed.all_reduce(idx, op=torch.distributed.ReduceOp.MAX)
    return {n: names[i] if i >= 0 else n for n, i in zip(names, idx.tolist())}
