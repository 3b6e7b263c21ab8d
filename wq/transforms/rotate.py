"""--rotate: an orthogonal rotation of the residual stream (and of each attention head's values), folded
into the weights offline, so the saved checkpoint is a plain model of the same architecture.

Written from the published idea (QuaRot / SpinQuant's offline rotations R1 and R2), in wq's terms:

    R1 = D H / sqrt(hidden), a seeded randomized Hadamard matrix (wq.transforms.hadamard):
        every norm's scale is first folded into the Linears reading it (fold.fold_norm_), then
        embedding E' = E R1; readers W' = W R1; writers W' = R1^T W; head W' = W diag(g_final) R1
    R2 = a randomized Hadamard of head_dim, per attention head: v_proj's rows and o_proj's columns
        (attention mixes value vectors linearly per head, so the rotation passes through it)

Outliers concentrated in a few channels are spread over all of them, which is what group-wise weight
quantization needs. The unquantized model computes the same logits (to float rounding; the tests
check it). A tied lm_head must be untied when the final norm has a non-trivial scale (it is folded into
the head but not the embedding): that is logged and recorded, and the checkpoint's config says
tie_word_embeddings = false so every loader reads the separate head.

The per-module functions (rotate_embedding_ / rotate_block_ / rotate_head_) let a streamed pipeline
rotate each block when it is loaded; rotate_model does the whole model at once.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from . import fold
from .hadamard import hadamard, random_orthogonal
from .layout import BlockLayout, LayoutError, block_layout, is_norm, is_rms_norm

log = logging.getLogger(__name__)


@dataclass
class RotationInfo:
    """What was done (recorded in wq.json)."""

    seed: int
    hidden: int
    residual: str  # "hadamard" or "random orthogonal"
    head_dim: int | None  # R2's size (None: no head rotation)
    blocks: int
    untied_lm_head: bool

    def to_dict(self) -> dict:
        return asdict(self)


def residual_rotation(hidden: int, seed: int = 0) -> Tensor:
    """R1 [hidden, hidden] float64."""
    return random_orthogonal(hidden, seed)


def head_rotation(head_dim: int, seed: int = 0) -> Tensor:
    """R2 [head_dim, head_dim] float64 (its own seed stream)."""
    return random_orthogonal(head_dim, seed + 1_000_003)


def _check_norm(block_name: str, norm: nn.Module) -> None:
    if not is_rms_norm(norm):
        raise LayoutError(f"{block_name}: {type(norm).__name__} is not an RMSNorm without bias; rotation needs "
                          "RMSNorm (LayerNorm subtracts the mean, which does not commute with a rotation)")


@torch.no_grad()
def rotate_block_(block: nn.Module, Q: Tensor, Qh: Tensor | None = None, layout: BlockLayout | None = None) -> None:
    """Rotate one decoder block in place: fold its two norms, rotate readers / writers by Q (R1), and the
    value/output heads by Qh (R2) when given."""
    lay = layout or block_layout(block)
    for norm_name, readers in ((lay.attn_norm, lay.attn_readers), (lay.mlp_norm, lay.mlp_readers)):
        norm = block.get_submodule(norm_name)
        _check_norm(type(block).__name__, norm)
        fold.fold_norm_(norm, [block.get_submodule(r) for r in readers])
    for r in lay.attn_readers + lay.mlp_readers:
        fold.rotate_inputs_(block.get_submodule(r), Q)
    for w in lay.writers:
        fold.rotate_outputs_(block.get_submodule(w), Q)
    if Qh is not None:
        for h in lay.heads:
            if Qh.shape[0] != h.head_dim:
                raise ValueError(f"head rotation is {Qh.shape[0]}-dim but {h.v} has head_dim {h.head_dim}")
            fold.rotate_outputs_(block.get_submodule(h.v), torch.block_diag(*[Qh] * h.n_kv))
            fold.rotate_inputs_(block.get_submodule(h.o), torch.block_diag(*[Qh] * h.n_heads))


@torch.no_grad()
def rotate_embedding_(embedding: nn.Module, Q: Tensor) -> None:
    fold.rotate_embedding_(embedding, Q)


@torch.no_grad()
def rotate_head_(final_norm: nn.Module, head: nn.Module, Q: Tensor) -> None:
    """Fold the final norm into the (untied) head and rotate the head's inputs."""
    _check_norm("final norm", final_norm)
    fold.fold_norm_(final_norm, [head])
    fold.rotate_inputs_(head, Q)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the longest one whose first element has a known layout."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and (best is None or len(mod) > len(best[1])):
            try:
                block_layout(mod[0])
            except LayoutError:
                continue
            best = (name, mod)
    if best is None:
        raise LayoutError(f"{type(model).__name__}: no list of pre-norm decoder blocks with a known layout")
    return best


def final_norm(model: nn.Module, blocks_name: str) -> nn.Module:
    """The one norm outside the decoder blocks (applied before the head)."""
    norms = [(n, m) for n, m in model.named_modules() if is_norm(m) and not n.startswith(blocks_name + ".")]
    if len(norms) != 1:
        raise LayoutError(f"expected one norm outside {blocks_name}, found {[n for n, _ in norms]}")
    return norms[0][1]


def untie_head_(model: nn.Module) -> bool:
    """Give lm_head its own copy of the tied embedding; say so in the config. True if it was tied."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not emb.weight:
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    log.warning("rotate: lm_head was tied to the embedding; untied (the final norm's scale folds into the head "
                "only), which stores %s more parameters; the checkpoint says tie_word_embeddings=false",
                f"{head.weight.numel():,}")
    return True


@torch.no_grad()
def rotate_model(model: nn.Module, *, seed: int = 0, heads: bool = True) -> RotationInfo:
    """Rotate a causal LM in place (see the module doc). The unquantized function is unchanged."""
    blocks_name, blocks = decoder_blocks(model)
    layouts = [block_layout(b) for b in blocks]
    hidden = layouts[0].hidden
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None:
        raise LayoutError(f"{type(model).__name__} has no output embedding (lm_head) to rotate")
    norm = final_norm(model, blocks_name)
    _check_norm("final norm", norm)
    untied = False
    if head.weight is emb.weight and not torch.all(fold.norm_scale(norm) == 1):
        untied = untie_head_(model)
    Q = residual_rotation(hidden, seed)
    head_dims = {h.head_dim for lay in layouts for h in lay.heads}
    Qh = head_rotation(head_dims.pop(), seed) if heads and len(head_dims) == 1 else None
    rotate_embedding_(emb, Q)
    for b, lay in zip(blocks, layouts):
        rotate_block_(b, Q, Qh, lay)
    if head.weight is emb.weight:  # still tied: g_final == 1, the head is the rotated embedding already
        fold.set_norm_scale_(norm, torch.ones(hidden, dtype=torch.float64))
    else:
        rotate_head_(norm, head, Q)
    info = RotationInfo(seed=seed, hidden=hidden, residual="hadamard" if hadamard(hidden) is not None
                        else "random orthogonal", head_dim=None if Qh is None else Qh.shape[0], blocks=len(blocks),
                        untied_lm_head=untied)
    log.info("rotated the residual stream (%s %d, seed %d)%s over %d blocks", info.residual, hidden, seed,
             f" and attention heads ({info.head_dim})" if Qh is not None else "", len(blocks))
    return info
