"""Where a decoder block reads and writes its residual stream.

Pre-norm blocks, h = h + attn(norm1(h)); h = h + mlp(norm2(h)), with the norms and sub-modules under
known names (Llama, Mistral, Qwen2/3 (+MoE), Mixtral, Phi-3, Granite, SmolLM..., and GPT-2's ln_1/attn/
ln_2/mlp). Inside them, by structure rather than by projection names:

    readers   Linears (or Conv1D) under attn / mlp whose input is the normed residual stream:
              in_features == hidden and not a writer (q/k/v, gate/up, every expert's gate/up, routers)
    writers   Linears whose output is added back to the residual stream: out_features == hidden and
              a writer's name (o_proj, down_proj, w2, c_proj, dense, out_proj, wo)
    heads     attention value/output pairs (v_proj, o_proj) with their head geometry
    up_down   (up, down) pairs of each gated MLP or expert: down(act(gate) * up) is linear in up, so a
              scale moves from up's outputs to down's inputs exactly (not so through GPT-2's GELU)

Anything else that holds a matrix under attn / mlp (fused MoE experts stored as one 3-D tensor) is
refused by name, so a transform never silently skips weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .weights import is_transposed

# (attention-side norm, attention, mlp-side norm, mlp): the names of pre-norm decoder blocks
SLOTS = (
    ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
    ("input_layernorm", "self_attn", "post_attention_layernorm", "block_sparse_moe"),
    ("ln_1", "attn", "ln_2", "mlp"),
)
WRITERS = {"o_proj", "down_proj", "w2", "c_proj", "dense", "out_proj", "wo", "dense_4h_to_h"}
UP_DOWN = (("up_proj", "down_proj"), ("w3", "w2"))  # gated MLPs only: down(act(gate) * up) is linear in up


class LayoutError(ValueError):
    """The block does not have a layout wq's transforms understand (the message says which part)."""


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_transposed(m)


def in_out(m: nn.Module) -> tuple[int, int]:
    w = m.weight
    return (w.shape[0], w.shape[1]) if is_transposed(m) else (w.shape[1], w.shape[0])


def is_norm(m: nn.Module) -> bool:
    name = type(m).__name__
    w = getattr(m, "weight", None)
    return ("Norm" in name or isinstance(m, nn.LayerNorm)) and w is not None and w.dim() == 1


def is_rms_norm(m: nn.Module) -> bool:
    return is_norm(m) and "RMSNorm" in type(m).__name__ and getattr(m, "bias", None) is None


@dataclass
class Heads:
    v: str  # value projection [n_kv * head_dim, hidden]
    o: str  # output projection [hidden, n_heads * head_dim]
    head_dim: int
    n_heads: int
    n_kv: int


@dataclass
class BlockLayout:
    hidden: int
    attn_norm: str
    mlp_norm: str
    attn_readers: list[str] = field(default_factory=list)
    mlp_readers: list[str] = field(default_factory=list)
    writers: list[str] = field(default_factory=list)
    heads: list[Heads] = field(default_factory=list)
    up_down: list[tuple[str, str]] = field(default_factory=list)


def block_layout(block: nn.Module) -> BlockLayout:
    """The residual-stream layout of one decoder block (names relative to it); LayoutError if unknown."""
    children = dict(block.named_children())
    slots = next((s for s in SLOTS if all(n in children for n in s)), None)
    if slots is None:
        raise LayoutError(f"{type(block).__name__}: not a pre-norm block with known names (children "
                          f"{sorted(children)}); supported: {', '.join('/'.join(s) for s in SLOTS)}")
    attn_norm, attn, mlp_norm, mlp = slots
    extra = sorted(n for n, m in children.items() if is_norm(m) and n not in (attn_norm, mlp_norm))
    if extra:
        raise LayoutError(f"{type(block).__name__} has more norms on the residual path ({', '.join(extra)}): "
                          "post-norm blocks (Gemma 2/3, OLMo 2) are not supported")
    for n in (attn_norm, mlp_norm):
        if not is_norm(children[n]):
            raise LayoutError(f"{type(block).__name__}.{n} is {type(children[n]).__name__}, not a norm")
    hidden = children[attn_norm].weight.shape[0]
    lay = BlockLayout(hidden=hidden, attn_norm=attn_norm, mlp_norm=mlp_norm)
    for side, readers in ((attn, lay.attn_readers), (mlp, lay.mlp_readers)):
        owned = set()
        for name, m in children[side].named_modules(prefix=side):
            if not is_linear(m):
                continue
            owned.add(id(m.weight))
            i, o = in_out(m)
            leaf = name.rsplit(".", 1)[-1]
            if leaf in WRITERS and o == hidden:
                lay.writers.append(name)
            elif i == hidden:
                readers.append(name)
        for pname, p in children[side].named_parameters(prefix=side):
            if p.dim() >= 2 and id(p) not in owned:
                raise LayoutError(f"{pname} {tuple(p.shape)} is not held by a Linear (fused MoE experts?); "
                                  "wq's transforms need per-expert Linear modules")
        for name, m in children[side].named_modules(prefix=side):
            sub = dict(m.named_children())
            for up, down in UP_DOWN:
                if up in sub and down in sub and is_linear(sub[up]) and is_linear(sub[down]):
                    lay.up_down.append((f"{name}.{up}", f"{name}.{down}"))
    a = children[attn]
    if hasattr(a, "v_proj") and hasattr(a, "o_proj") and is_linear(a.v_proj) and is_linear(a.o_proj):
        head_dim = getattr(a, "head_dim", None)
        n_kv = in_out(a.v_proj)[1] // head_dim if head_dim else None
        n_heads = in_out(a.o_proj)[0] // head_dim if head_dim else None
        if head_dim and n_kv * head_dim == in_out(a.v_proj)[1] and n_heads * head_dim == in_out(a.o_proj)[0] \
                and n_heads % n_kv == 0:
            lay.heads.append(Heads(f"{attn}.v_proj", f"{attn}.o_proj", head_dim, n_heads, n_kv))
    return lay
