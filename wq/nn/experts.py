"""QuantExperts: the one module for a mixture of experts, one sub-module per expert.

transformers 5 stores the routed experts of an MoE layer as fused 3-D parameters (one tensor per
projection holding every expert: `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I], or transposed),
which surgery looking for nn.Linear never sees. `unfuse(module)` turns such a module into a
QuantExperts: a ModuleList of `ExpertMLP`s whose `gate_proj` / `up_proj` / `down_proj` are plain
[out, in] nn.Linear views of the fused tensors (the fused gate_up is split into gate and up). From
there every algorithm quantizes experts like any other Linear (gptq hooks see only the tokens the
router sends to each expert), QuantLinear replaces each projection, and the state dict carries the
per-expert names of the original Hub checkpoints (`...experts.17.gate_proj.qweight`).

The forward reproduces the fused module's own: the same routing arguments, gating and weighting,
expert by expert. Layouts are read from the flags transformers' `use_experts_implementation`
attaches (is_transposed, is_concatenated, has_bias, has_gate, has_post_expert_norm) and the
module's `_apply_gate`; Llama 4's undecorated experts (every expert applied to its own slice of a
pre-routed [E * T, H] input) are the "dense" protocol.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertsLayout:
    """How a fused experts module stores its weights and is called (data read off the module)."""

    num_experts: int
    hidden: int  # input width of gate/up, output width of down
    intermediate: int  # output width of gate and up, input width of down
    gated: bool  # gate_up_proj (gate and up) vs up_proj only
    transposed: bool  # weights stored [E, in, out] instead of [E, out, in]
    concatenated: bool  # gate_up rows [gate; up] (True) or interleaved [g0, u0, g1, u1, ...] (False)
    bias: bool  # gate_up_proj_bias / up_proj_bias and down_proj_bias
    post_norm: bool  # a norm applied to each expert's output (has_post_expert_norm)
    protocol: str  # "topk": forward(x [T, H], top_k_index [T, k], top_k_weights [T, k]); "dense": Llama 4
    default_gate: bool  # act_fn(gate) * up; otherwise the module's own _apply_gate


def fused_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of a fused experts module, or None when `module` is not one wq can unfuse."""
    params = dict(module.named_parameters(recurse=False))
    up_name = "gate_up_proj" if "gate_up_proj" in params else "up_proj" if "up_proj" in params else None
    down = params.get("down_proj")
    if up_name is None or down is None or down.dim() != 3 or params[up_name].dim() != 3:
        return None
    gated = up_name == "gate_up_proj"
    decorated = hasattr(module, "is_transposed")
    try:
        args = [p for p in inspect.signature(module.forward).parameters if p not in ("self", "args", "kwargs")]
    except (TypeError, ValueError):
        args = []
    if decorated:
        transposed, concatenated = bool(module.is_transposed), bool(getattr(module, "is_concatenated", True))
        protocol = "topk"
    elif args == ["hidden_states"] and gated:  # Llama 4: bmm over a pre-routed [E, T, H] view
        transposed, concatenated, protocol = True, True, "dense"
    else:
        return None
    up = params[up_name]
    num_experts = up.shape[0]
    out_up, in_up = (up.shape[2], up.shape[1]) if transposed else (up.shape[1], up.shape[2])
    out_down, in_down = (down.shape[2], down.shape[1]) if transposed else (down.shape[1], down.shape[2])
    inter = out_up // 2 if gated else out_up
    if down.shape[0] != num_experts or in_down != inter or out_down != in_up or (gated and out_up % 2):
        return None
    bias = bool(getattr(module, "has_bias", False))
    if bias and (f"{up_name}_bias" not in params or "down_proj_bias" not in params):
        return None
    known = {up_name, "down_proj"} | ({f"{up_name}_bias", "down_proj_bias"} if bias else set())
    if set(params) - known or any(True for _ in module.buffers(recurse=False)):
        return None  # state wq would not carry over
    post_norm = bool(getattr(module, "has_post_expert_norm", False))
    children = {n for n, _ in module.named_children()} - {"act_fn"} - ({"post_expert_norm"} if post_norm else set())
    if children:
        return None
    default_gate = True
    if gated and decorated:
        from transformers.integrations.moe import _default_apply_gate

        default_gate = getattr(type(module), "_apply_gate", _default_apply_gate) is _default_apply_gate
    return ExpertsLayout(num_experts=num_experts, hidden=in_up, intermediate=inter, gated=gated,
                         transposed=transposed, concatenated=concatenated, bias=bias, post_norm=post_norm,
                         protocol=protocol, default_gate=default_gate)


class ExpertMLP(nn.Module):
    """One expert: gate_proj (when gated), up_proj, down_proj; each an nn.Linear or a QuantLinear."""

    def __init__(self, hidden: int, intermediate: int, gated: bool, bias: bool, device=None, dtype=None):
        super().__init__()
        kw = {"bias": bias, "device": device, "dtype": dtype}
        if gated:
            self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)


class QuantExperts(nn.Module):
    """The experts of one MoE layer, expert e as child "e" (state-dict names `{e}.gate_proj.qweight` ...).

    Built by `unfuse` from a fused module, or with uninitialised projections by `empty` (for loading).
    Keeps the fused module's activation (`act_fn`), its custom gate (`_apply_gate` of the original,
    kept without its weights) and its post-expert norm.
    """

    def __init__(self, layout: ExpertsLayout, experts: list[ExpertMLP], act_fn: nn.Module | None,
                 gate_owner: nn.Module | None = None, post_expert_norm: nn.Module | None = None):
        super().__init__()
        self.layout = layout
        self.num_experts = layout.num_experts
        for e, mlp in enumerate(experts):
            self.add_module(str(e), mlp)
        self.act_fn = act_fn
        self.post_expert_norm = post_expert_norm
        self.__dict__["_gate_owner"] = gate_owner  # the original module without weights, for a custom gate

    def __getitem__(self, e: int) -> ExpertMLP:
        return self._modules[str(e)]

    def experts(self) -> list[ExpertMLP]:
        return [self._modules[str(e)] for e in range(self.num_experts)]

    # ------------------------------------------------------------------------------------ forward
    def down_input(self, e: int, x: Tensor) -> Tensor:
        """What expert e's down_proj reads for tokens x [n, hidden]: the gated activation [n, intermediate]."""
        mlp = self[e]
        lay = self.layout
        if lay.gated:
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)  # [n, I] each
            if lay.default_gate:
                h = self.act_fn(gate) * up
            else:  # the model's own gate reads the fused gate_up output in its stored order
                gate_up = torch.cat([gate, up], -1) if lay.concatenated else torch.stack([gate, up], -1).flatten(-2)
                h = self._gate_owner._apply_gate(gate_up)
        else:
            h = self.act_fn(mlp.up_proj(x))
        return h

    def _expert(self, e: int, x: Tensor) -> Tensor:
        """One expert on its tokens: x [n, hidden] -> [n, hidden]."""
        y = self[e].down_proj(self.down_input(e, x))
        if self.post_expert_norm is not None:
            y = self.post_expert_norm(y)
        return y

    def forward(self, hidden_states: Tensor, top_k_index: Tensor | None = None,
                top_k_weights: Tensor | None = None, **kwargs) -> Tensor:
        if self.layout.protocol == "dense":  # Llama 4: hidden [E * T, H], expert e reads rows e*T..(e+1)*T
            x = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])  # [E, T, H]
            if self.layout.bias or self.post_expert_norm is not None:
                return torch.cat([self._expert(e, x[e]) for e in range(self.num_experts)], 0)
            # rows the router did not send to expert e are zero (its score is folded into the input) and map
            # to zero: run each expert on its routed tokens only, as the top-k protocol does
            out = torch.zeros_like(x)
            for e in range(self.num_experts):
                rows = x[e].abs().amax(-1).nonzero().squeeze(-1)  # [n]
                if rows.numel():
                    out[e, rows] = self._expert(e, x[e, rows]).to(out.dtype)
            return out.view(-1, x.shape[-1])
        if top_k_index is None:  # gpt-oss names them router_indices / routing_weights
            top_k_index, top_k_weights = kwargs.get("router_indices"), kwargs.get("routing_weights")
        out = torch.zeros_like(hidden_states)  # [T, H]
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)  # [T * k]; values >= E are masked slots (expert parallel)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts + 1).tolist()
        weights = top_k_weights.reshape(-1)
        start = 0
        for e, n in enumerate(counts):
            if n and e < self.num_experts:
                slots = order[start:start + n]  # [n] positions in [T * k]
                tokens = slots // k
                y = self._expert(e, hidden_states[tokens]) * weights[slots, None]
                # index_put_ rather than index_add_: the same sums (a token meets an expert once), but index_add_
                # on CPU took 116 ms instead of 0.07 ms per call with 2 threads on a busy machine
                out.index_put_((tokens,), y.to(out.dtype), accumulate=True)
            start += n
        return out

    def extra_repr(self) -> str:
        lay = self.layout
        return (f"num_experts={lay.num_experts}, hidden={lay.hidden}, intermediate={lay.intermediate}, "
                f"gated={lay.gated}, protocol={lay.protocol}")

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def empty(cls, module: nn.Module, layout: ExpertsLayout | None = None, device=None,
              dtype: torch.dtype | None = None) -> QuantExperts:
        """A QuantExperts shaped like the fused `module`, with uninitialised projections (for loading)."""
        layout = layout or fused_layout(module)
        if layout is None:
            raise ValueError(f"{type(module).__name__} is not a fused experts layout wq handles")
        like = next(module.parameters())
        device = device or like.device
        dtype = dtype or like.dtype
        experts = [ExpertMLP(layout.hidden, layout.intermediate, layout.gated, layout.bias, device=device, dtype=dtype)
                   for _ in range(layout.num_experts)]
        return cls(layout, experts, getattr(module, "act_fn", None), _gate_owner(module, layout),
                   getattr(module, "post_expert_norm", None) if layout.post_norm else None)


def _gate_owner(module: nn.Module, layout: ExpertsLayout) -> nn.Module | None:
    """The original module stripped of its weights (its _apply_gate reads only scalar attributes)."""
    if layout.default_gate:
        return None
    shell = module.__class__.__new__(module.__class__)
    shell.__dict__.update({k: v for k, v in module.__dict__.items() if k not in ("_parameters", "_buffers",
                                                                                  "_modules")})
    shell._parameters, shell._buffers, shell._modules = {}, {}, {}
    return shell


def _rows(w: Tensor, e: int, transposed: bool) -> Tensor:
    """Expert e's [out, in] matrix of a fused [E, out, in] (or transposed [E, in, out]) tensor (a view)."""
    return w[e].t() if transposed else w[e]


def split_fused(layout: ExpertsLayout, fused: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-expert [out, in] weights (and biases) of fused tensors, as QuantExperts state-dict keys
    ("3.gate_proj.weight" ...). fused: the fused module's own names (gate_up_proj / up_proj, down_proj,
    their _bias). Views, no copies."""
    inter = layout.intermediate
    up_name = "gate_up_proj" if layout.gated else "up_proj"
    w_up, w_down = fused[up_name], fused["down_proj"]
    b_up, b_down = fused.get(f"{up_name}_bias"), fused.get("down_proj_bias")
    out: dict[str, Tensor] = {}
    for e in range(layout.num_experts):
        up_rows = _rows(w_up, e, layout.transposed)  # [2I or I, H]
        parts = {"up_proj": (slice(None), up_rows)}
        if layout.gated:
            gate_sel, up_sel = ((slice(0, inter), slice(inter, 2 * inter)) if layout.concatenated
                                else (slice(0, None, 2), slice(1, None, 2)))
            parts = {"gate_proj": (gate_sel, up_rows[gate_sel]), "up_proj": (up_sel, up_rows[up_sel])}
        for proj, (sel, w) in parts.items():
            out[f"{e}.{proj}.weight"] = w
            if b_up is not None:
                out[f"{e}.{proj}.bias"] = b_up[e, sel]
        out[f"{e}.down_proj.weight"] = _rows(w_down, e, layout.transposed)
        if b_down is not None:
            out[f"{e}.down_proj.bias"] = b_down[e]
    return out


def unfuse(module: nn.Module) -> QuantExperts:
    """A QuantExperts whose projections are nn.Linear views of `module`'s fused weights (no copy).

    Raises ValueError (naming the class) when the layout is not one wq handles."""
    layout = fused_layout(module)
    if layout is None:
        raise ValueError(f"{type(module).__name__}: a fused experts layout wq does not handle")
    q = QuantExperts.empty(module, layout, device="meta")
    fused = {n: p.detach() for n, p in module.named_parameters(recurse=False)}
    for key, t in split_fused(layout, fused).items():
        e, proj, kind = key.split(".")
        setattr(q[int(e)].__getattr__(proj), kind, nn.Parameter(t, requires_grad=False))
    return q


def find_fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Every module holding fused expert weights ({name: module}), handled by wq or not (see fused_layout)."""
    found = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantExperts):
            continue
        params = dict(mod.named_parameters(recurse=False))
        w = params.get("down_proj", params.get("gate_up_proj"))
        if w is not None and w.dim() == 3:
            found[name] = mod
    return found
