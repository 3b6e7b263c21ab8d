"""GPTQ: quantize one column at a time and spread its error over the not-yet-quantized columns.

With H = 2/n sum x^T x the Hessian of the layer's output error ||X W^T - X Wq^T||^2 in W, the error of
quantizing column j is compensated optimally on the remaining columns through the upper Cholesky
factor U of H^-1 (OBQ's update, computed once). Columns go in blocks of `block`: within a block the
updates are applied column by column, and to the columns after it in one matmul (lazy batch updates).

Act-order quantizes columns by decreasing H diagonal (the most sensitive first). With static groups
(default) every group's scale/zero are computed up front from the original weights of its own
consecutive columns, so group g still holds columns [g*G, (g+1)*G) and the checkpoint's g_idx is the
plain i // G: codes are un-permuted at the end and nothing about the layout changes. Without static
groups a group is G consecutive columns *in act order* and g_idx records that (g_idx[perm[k]] = k // G).
"""

from __future__ import annotations

import logging
import tempfile

import numpy as np
import torch
from torch import Tensor

from .. import primitives as P
from ..packing import PackedWeight
from ..scheme import QuantScheme
from .base import ALGORITHMS, Algorithm, QuantResult
from .rtn import rtn_quantize

log = logging.getLogger(__name__)


def _qparams(w: Tensor, scheme: QuantScheme, mse: bool) -> tuple[Tensor, Tensor]:
    """One (scale, zero) pair per row for a slice w [out, <=G] -> ([out], [out])."""
    one = QuantScheme(bits=scheme.bits, group_size=-1, sym=scheme.sym, fmt="int")
    scale, zero = P.search_clip(w, one) if mse else P.minmax_qparams(w, one)
    return scale[:, 0], zero[:, 0]


def _inverse_cholesky(H0: Tensor, damp: float, dead: Tensor | None = None,
                      perm: Tensor | None = None) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + damp*mean(diag) I)^-1, where H is H0 with the diagonal of `dead` inputs
    set to 1, permuted by `perm` (act-order); retries with 10x damping if H is not positive definite. H0 is not
    modified: each attempt factorizes one copy in place (`_factor_in_place`), so two [in, in] fp32 matrices
    are alive at once, H0 included."""
    dead_p = None if dead is None or perm is None else dead[perm]

    def attempt(d: float) -> Tensor | None:
        H = H0.float().clone() if perm is None else H0.float()[perm][:, perm]
        return _factor_in_place(H, d, dead if perm is None else dead_p)
    return _with_damping(attempt, damp)


def _with_damping(attempt, damp: float) -> tuple[Tensor, float]:
    """attempt(d) -> U, or None when the damped H is not positive definite: tried at damp, then 10x more each
    time (at most 6 tries) -> (U, the damp that worked)."""
    d = damp
    for _ in range(6):
        U = attempt(d)
        if U is not None:
            if d != damp:
                log.warning("gptq: Hessian not positive definite at damp=%g; used damp=%g", damp, d)
            return U, d
        d = max(d * 10, 1e-4)
    raise RuntimeError(f"gptq: Hessian is not positive definite even with damp={d / 10:g}; the calibration "
                       f"inputs may contain inf/nan (try more --nsamples or a larger --damp)")


def _factor_in_place(H: Tensor, damp: float, dead: Tensor | None) -> Tensor | None:
    """H [in, in] fp32, symmetric -> the upper Cholesky factor U of (H + damp*mean(diag) I)^-1 (dead inputs'
    diagonal set to 1 first), computed in H's own storage: None (H destroyed) if not positive definite.

    H^-1's factor comes from LAPACK's in-place potrf / potri / potrf on the column-major view H.mT (equal to H
    by symmetry): no second [in, in] matrix (a 28672-input Hessian is 3.1 GiB). U is a view of H's storage."""
    if dead is not None:
        H[dead, dead] = 1
    H.diagonal().add_(damp * float(H.diagonal().mean()))
    A = H.mT  # column-major: LAPACK works on it without a transposed copy
    info = torch.empty((), dtype=torch.int32, device=H.device)
    torch.linalg.cholesky_ex(A, out=(A, info))  # A = L, H = L L^T
    if int(info) != 0:
        return None
    torch.cholesky_inverse(A, out=A)  # A = H^-1
    torch.linalg.cholesky_ex(A, upper=True, out=(A, info))  # A = U, H^-1 = U^T U
    return A if int(info) == 0 else None


def _spill(H: Tensor, directory: str | None = None):
    """A way back to H's current values after H is factorized in place: a copy in CPU memory for a GPU tensor,
    else an unlinked temporary file in `directory` (the run's output disk: /tmp may be RAM-backed), read back
    straight into H's storage. Returns a function that writes the values back into H."""
    if H.device.type != "cpu":
        host = H.cpu()
        return lambda: H.copy_(host)
    f = tempfile.TemporaryFile(dir=directory)
    f.write(H.numpy().data)
    f.flush()

    def restore():
        f.seek(0)
        buf = memoryview(H.numpy().reshape(-1).view(np.uint8))
        done = 0
        while done < len(buf):
            n = f.readinto(buf[done:])
            if not n:
                raise OSError(f"gptq: the spilled Hessian in {directory or tempfile.gettempdir()} is truncated")
            done += n
    return restore


def _inverse_cholesky_consuming(H: Tensor, damp: float, dead: Tensor,
                                spill_dir: str | None = None):
    """_inverse_cholesky in H's own storage (the caller gives H up until `restore` is called): one [in, in] matrix
    instead of two. H is spilled first (`_spill`); a failed attempt (not positive definite) restores it and
    retries with 10x damping. -> (U, damp used, restore: puts H's original values back, U then invalid)."""
    restore = _spill(H, spill_dir)
    tried = []

    def attempt(d: float) -> Tensor | None:
        if tried:
            restore()  # the previous attempt destroyed H
        tried.append(d)
        return _factor_in_place(H, d, dead)
    U, d = _with_damping(attempt, damp)
    return U, d, restore


@torch.no_grad()
def gptq_quantize(
    w: Tensor,
    H: Tensor,
    scheme: QuantScheme,
    *,
    block: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = True,
    mse: bool = False,
    consume_H: bool = False,
    spill_dir: str | None = None,
) -> QuantResult:
    """w: [out, in] weights, H: [in, in] Hessian of the layer's inputs -> codes minimising tr(E H E^T).

    consume_H: H (fp32, contiguous) may be used as scratch: H^-1's factor is computed in its storage and H is
    read back from a spilled copy (an unlinked file in `spill_dir`, or host memory on a GPU) for the stats, so one
    [in, in] matrix is alive instead of two (121 MiB less for a 5632-input down_proj). Same result. Ignored with
    act_order (its permuted copy is needed anyway).

    damp: fraction of the mean diagonal added to H; block: columns per lazy update; act_order /
    static_groups: see the module doc; mse: search a clipped range per group instead of min-max.
    stats: loss = tr((W-Wq) H (W-Wq)^T) with the undamped H, damp actually used, output_error =
    sqrt(loss / tr(W H W^T)) (relative output error on the calibration inputs) and rtn_output_error, the same
    for round-to-nearest codes.
    """
    out_f, in_f = w.shape
    if H.shape != (in_f, in_f):
        raise ValueError(f"gptq: Hessian shape {tuple(H.shape)} does not match in_features={in_f}")
    H0 = H  # modified only with consume_H, and restored before the stats
    G = scheme.group_for(in_f)
    n_groups = scheme.n_groups(in_f)

    diag = H0.diagonal().float().clone()  # a copy: with consume_H, H's diagonal is overwritten
    dead = diag == 0  # inputs that were always zero: any value works, quantize them to 0 (their H diagonal: 1)
    # the column loop works on a transposed copy: column k of W is the contiguous row k of Wt (the only copy)
    Wt = torch.empty(in_f, out_f, device=w.device).copy_(w.detach().t())  # [in, out] fp32, w in any float dtype
    Wt[dead] = 0

    static = act_order and static_groups
    scale = torch.zeros(out_f, n_groups, device=Wt.device)
    zero = torch.zeros(out_f, n_groups, device=Wt.device)
    if static:  # from the original weights of each group's own columns, before any update
        for g in range(n_groups):
            scale[:, g], zero[:, g] = _qparams(Wt[g * G:(g + 1) * G].t(), scheme, mse)

    perm = torch.arange(in_f, device=Wt.device)
    if act_order:
        perm = torch.argsort(torch.where(dead, torch.ones_like(diag), diag), descending=True, stable=True)
        Wt = Wt[perm]
    restore = None
    if consume_H and not act_order and H0.dtype == torch.float32 and H0.is_contiguous():
        U, used_damp, restore = _inverse_cholesky_consuming(H0, damp, dead, spill_dir)  # [in, in] upper, in H0
    else:
        U, used_damp = _inverse_cholesky(H0, damp, dead, perm if act_order else None)  # [in, in] upper

    # group of the k-th processed column: its own (static / natural order) or its act-order position
    col_group = perm // G if (static or not act_order) else torch.arange(in_f, device=Wt.device) // G
    col_group = col_group.tolist()
    Qt = torch.zeros(in_f, out_f, device=Wt.device, dtype=torch.uint8)  # codes (<= 8 bits), processing order
    maxq = scheme.maxq
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = Wt[i1:i2]  # [b, out] view: updated in place
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            k = i1 + i
            g = col_group[k]
            if not static and k % G == 0:  # dynamic group: params from the current (updated) weights
                scale[:, g], zero[:, g] = _qparams(Wt[k:k + G].t(), scheme, mse)
            s, z = scale[:, g], zero[:, g]
            col = W1[i]  # [out]
            q = torch.clamp(torch.round(col / s) + z, 0, maxq)
            Qt[k] = q
            err = E1[i]
            torch.sub(col, (q - z) * s, out=err)
            err.div_(U1[i, i])
            if i + 1 < i2 - i1:
                W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1)  # spread the error over the block's later columns
        if i2 < in_f:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1)  # lazy update of everything after the block
    del Wt, U
    if restore is not None:
        restore()  # H0 holds the Hessian again
    Q = Qt.t()  # [out, in] uint8 codes (packed without a whole int32 copy)
    g_idx = None
    if act_order:
        inv = torch.argsort(perm)
        Q = Q[:, inv]  # back to the original column order
        if not static:
            g_idx = torch.tensor(col_group, device=Q.device, dtype=torch.int32)[inv]
    packed = PackedWeight.from_codes(Q, scale, zero, scheme, g_idx=g_idx)
    del Q, Qt
    error, stats = _objective_packed(w, packed, H0, scheme, mse)
    return QuantResult(packed, error, {**stats, "damp": used_damp})


_CHUNK = 128  # output rows per step of the stats: [128, in] fp32 temporaries (2.8 MiB at in=5632), not [512, in]


def _quad(E: Tensor, H: Tensor) -> float:
    """tr(E H E^T) for E [rows, in], `_CHUNK` rows at a time."""
    return sum(float((e @ H * e).sum()) for e in E.split(_CHUNK))


def _objective_packed(w: Tensor, packed: PackedWeight, H: Tensor, scheme: QuantScheme, mse: bool,
                      rows: int = 512) -> tuple[float, dict]:
    """(relative weight error, _objective's stats) from the packed result, dequantized `_CHUNK` output rows at a
    time: never a whole [out, in] copy of the weight or of its error, and temporaries small enough not to pile
    up in glibc's heap (512-row steps left ~170 MiB of freed heap behind at down_proj's shape)."""
    H = H.float()
    out_f = w.shape[0]
    step = -(-out_f // rows)
    loss = err_sq = w_sq = 0.0
    sampled = []
    for r0 in range(0, out_f, _CHUNK):
        r1 = min(r0 + _CHUNK, out_f)
        w0 = w[r0:r1].float()  # [chunk, in]: w may be bf16 (no whole fp32 copy)
        e = w0 - packed.rows(r0, r1).dequantize(torch.float32)
        loss += float((e @ H * e).sum())
        err_sq += float(e.pow(2).sum())
        w_sq += float(w0.pow(2).sum())
        sampled.append(e[-r0 % step::step].clone())  # the rows whose index is a multiple of step (a view would keep
        # every chunk's whole error alive: ~45 MiB at down_proj's shape)
    error = (err_sq ** 0.5) / max(w_sq ** 0.5, 1e-12)
    return error, _sampled_objective(w[::step].float(), torch.cat(sampled), H, scheme, mse, loss, sampled=step > 1)


def _objective(w: Tensor, w_hat: Tensor, H: Tensor, scheme: QuantScheme, mse: bool, rows: int = 512) -> dict:
    """loss = tr((W-Wq) H (W-Wq)^T), and the error gptq minimises relative to tr(W H W^T), next to round-to-nearest's
    on the same inputs: gptq trades weight error (often above rtn's) for output error, so the weight error alone
    reads like a regression. The relative errors sum over every `ceil(out / rows)`-th output row (exact up to
    `rows` rows; a fixed sample beyond, so they cost at most `rows` x in^2 multiply-adds each)."""
    W0, H = w.float(), H.float()
    E = W0 - w_hat
    step = -(-W0.shape[0] // rows)
    return _sampled_objective(W0[::step], E[::step], H, scheme, mse, _quad(E, H), sampled=step > 1)


def _sampled_objective(Ws: Tensor, Es: Tensor, H: Tensor, scheme: QuantScheme, mse: bool, loss: float,
                       sampled: bool) -> dict:
    """_objective's relative errors on a sample of output rows (Ws: those rows of W, fp32; Es: of W - w_hat;
    sampled False: every row, so Es's loss is `loss`)."""
    ref = rtn_loss = 0.0
    for wc in Ws.split(_CHUNK):  # rows are independent in rtn: chunks give the same codes
        e_rtn = wc - rtn_quantize(wc, scheme, mse=mse).packed.dequantize(torch.float32)
        ref += float((wc @ H * wc).sum())
        rtn_loss += float((e_rtn @ H * e_rtn).sum())
    err = _quad(Es, H) if sampled else loss
    return {"loss": loss, "output_error": (err / ref) ** 0.5 if ref > 0 else 0.0,
            "rtn_output_error": (rtn_loss / ref) ** 0.5 if ref > 0 else 0.0}


@torch.no_grad()
def gptq_quantize_many(ws: list[Tensor], Hs: list[Tensor], scheme: QuantScheme, *, block: int = 128,
                       damp: float = 0.01, mse: bool = False) -> list[QuantResult]:
    """gptq_quantize for several weights of one shape, each with its own Hessian, in one batched column loop
    (MoE: an experts layer's same-shaped projections). The loop's per-column work is a handful of small ops;
    batching B weights runs it once instead of B times. Same algorithm and result as gptq_quantize up to
    float summation order (batched matmuls); act-order is not batched (use gptq_quantize).

    ws: B tensors [out, in]; Hs: B tensors [in, in] (never modified)."""
    W = torch.stack([w.detach().float() for w in ws])  # [B, out, in]
    B, out_f, in_f = W.shape
    G = scheme.group_for(in_f)
    n_groups = scheme.n_groups(in_f)
    Us, damps = [], []
    for b, H in enumerate(Hs):
        if H.shape != (in_f, in_f):
            raise ValueError(f"gptq: Hessian shape {tuple(H.shape)} does not match in_features={in_f}")
        dead = H.diagonal() == 0  # inputs that were always zero: quantize them to 0
        W[b][:, dead] = 0
        U, d = _inverse_cholesky(H, damp, dead)
        Us.append(U)
        damps.append(d)
    U = torch.stack(Us)  # [B, in, in] upper
    del Us
    scale = torch.zeros(B, out_f, n_groups, device=W.device)
    zero = torch.zeros(B, out_f, n_groups, device=W.device)
    Wt = W.transpose(1, 2).contiguous()  # [B, in, out]: column k of each weight is row k here
    del W
    Qt = torch.zeros(B, in_f, out_f, device=Wt.device)
    maxq = scheme.maxq
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = Wt[:, i1:i2]  # [B, b, out] view, updated in place
        E1 = torch.empty_like(W1)
        U1 = U[:, i1:i2, i1:i2]  # [B, b, b]
        for i in range(i2 - i1):
            k = i1 + i
            g = k // G
            if k % G == 0:  # group parameters from the current (updated) weights of the group's columns
                cols = Wt[:, k:k + G].transpose(1, 2).reshape(B * out_f, -1)  # [B*out, <=G]
                sc, ze = _qparams(cols, scheme, mse)
                scale[:, :, g], zero[:, :, g] = sc.view(B, out_f), ze.view(B, out_f)
            s, z = scale[:, :, g], zero[:, :, g]  # [B, out]
            col = W1[:, i]  # [B, out]
            q = torch.clamp(torch.round(col / s) + z, 0, maxq)
            Qt[:, k] = q
            err = E1[:, i]
            torch.sub(col, (q - z) * s, out=err)
            err.div_(U1[:, i, i, None])
            if i + 1 < i2 - i1:  # spread the error over the block's later columns: W1[:, j] -= U1[:, i, j] err
                W1[:, i + 1:].baddbmm_(U1[:, i, i + 1:, None], err[:, None, :], alpha=-1)
        if i2 < in_f:
            Wt[:, i2:].baddbmm_(U[:, i1:i2, i2:].transpose(1, 2), E1, alpha=-1)
    results = []
    for b in range(B):
        Q = Qt[b].t().to(torch.int32)  # [out, in]
        packed = PackedWeight.from_codes(Q, scale[b], zero[b], scheme)
        w_hat = packed.dequantize(torch.float32)
        stats = {**_objective(ws[b], w_hat, Hs[b], scheme, mse), "damp": damps[b]}
        results.append(QuantResult(packed, P.relative_error(ws[b], w_hat), stats))
    return results


@ALGORITHMS.register("gptq")
class GPTQ(Algorithm):
    """Settings: damp (0.01), block_size (128), act_order (False), static_groups (True), mse (False)."""

    name = "gptq"
    needs_calibration = True
    granularity = "layer"
    consumes_hessian = True

    def quantize_weight(self, w: Tensor, scheme: QuantScheme, *, H: Tensor | None = None, **context) -> QuantResult:
        if H is None:
            raise ValueError("gptq needs the Hessian of the layer's inputs (H=); run it through wq.quantize_model "
                             "with calibration data")
        st = self.settings
        return gptq_quantize(w, H, scheme, block=int(st.get("block_size") or 128), damp=float(st.get("damp", 0.01)),
                             act_order=bool(st.get("act_order", False)),
                             static_groups=bool(st.get("static_groups", True)), mse=bool(st.get("mse", False)),
                             consume_H=bool(context.get("H_owned")), spill_dir=context.get("spill_dir"))

    def quantize_weights(self, ws: list[Tensor], scheme: QuantScheme, *, Hs: list[Tensor]) -> list[QuantResult] | None:
        """Several same-shaped weights at once (the pipeline batches an MoE layer's experts); None: not
        batchable with these settings (act-order), quantize one by one."""
        st = self.settings
        if bool(st.get("act_order", False)):
            return None
        return gptq_quantize_many(ws, Hs, scheme, block=int(st.get("block_size") or 128),
                                  damp=float(st.get("damp", 0.01)), mse=bool(st.get("mse", False)))
