"""QuantLinear: the one quantized Linear module. Holds a PackedWeight (integer schemes) or an Fp8Weight
(FP8 schemes, see wq/fp8.py) as buffers; forward dispatches."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..fp8 import FP8_DTYPES, Fp8Weight, fp8_reference_matmul
from ..kernels import dispatch, ops
from ..packing import PackedWeight, packed_size
from ..scheme import QuantScheme


class QuantLinear(nn.Module):
    """y = x @ dequant(W)^T + b, W stored packed (see PackedWeight / Fp8Weight for tensor shapes).

    Integer schemes: buffers qweight, scales, zeros (+ g_idx). FP8 schemes: buffers weight (float8) and
    weight_scale (fp32 [out, n_groups]), the compressed-tensors names.
    """

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme | str, bias: bool = False,
                 *, act_order: bool = False, bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        scheme = QuantScheme.parse(scheme)
        if scheme.is_cast:
            raise ValueError(f"{scheme} is a plain cast, not a QuantLinear: use wq.cast_model")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        n_groups = scheme.n_groups(in_features)
        if scheme.is_fp8:
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPES[scheme.fmt]))
            self.register_buffer("weight_scale", torch.zeros(out_features, n_groups, dtype=torch.float32))
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype) if bias else None)
            return
        self.register_buffer("qweight", torch.zeros(packed_size(in_features, scheme.bits), out_features,
                                                    dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(n_groups, out_features, dtype=torch.uint8))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32) if act_order else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype) if bias else None)

    @classmethod
    def from_packed(cls, pw: PackedWeight | Fp8Weight, bias: Tensor | None = None) -> QuantLinear:
        m = cls(pw.in_features, pw.out_features, pw.scheme, bias=bias is not None, act_order=pw.g_idx is not None,
                bias_dtype=bias.dtype if bias is not None else torch.bfloat16)
        if isinstance(pw, Fp8Weight):
            m.weight, m.weight_scale = pw.weight, pw.scale
        else:
            m.qweight, m.scales, m.zeros = pw.qweight, pw.scales, pw.zeros
        if pw.g_idx is not None:
            m.g_idx = pw.g_idx
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    @property
    def packed(self) -> PackedWeight | Fp8Weight:
        compact = self.__dict__.get("_compact")
        if compact is not None:  # rebuilt exactly from the CPU layout (see compact_)
            return compact.to_packed(self._shell())
        if self.scheme.is_fp8:
            return Fp8Weight(weight=self.weight, scale=self.weight_scale, scheme=self.scheme,
                             in_features=self.in_features, out_features=self.out_features)
        return PackedWeight(qweight=self.qweight, scales=self.scales, zeros=self.zeros, scheme=self.scheme,
                            in_features=self.in_features, out_features=self.out_features, g_idx=self.g_idx)

    def forward(self, x: Tensor) -> Tensor:
        if self.scheme.is_fp8:  # FP8: the reference kernel (dequantize, F.linear) on any device
            return fp8_reference_matmul(x, self.packed, self.bias)
        b = self._buffers  # plain dict reads: this runs once per layer per decoded token
        bias = b["bias"]
        if not ops.eager(x, bias):  # compile / autograd: the custom op (a compact layer rebuilds its tensors)
            return ops.quant_matmul(x, self.packed, bias)  # torch.ops.wq.dequant_matmul -> dispatch
        # eager inference: the kernel choice and its repacked weights are bound once per call shape
        # (a decode step runs every layer at the same M), keyed so that a forced kernel, new buffers or
        # in-place edits (load_state_dict) make a new plan
        qw = b["qweight"]
        key = (x.device, x.dtype, x.numel() // x.shape[-1] if x.numel() else 1,
               (dispatch.forced_kernel(), dispatch.exact_only()), id(qw), ops.tensor_version(qw), ops.tensor_version(b["scales"]),
               ops.tensor_version(b["zeros"]))
        plans = self.__dict__.setdefault("_plans", {})
        run = plans.get(key)
        if run is None:
            if len(plans) >= 64 or any(k[4:] != key[4:] for k in plans):
                plans.clear()  # many prefill lengths, or the buffers changed: old plans hold old tensors
            compact = self.__dict__.get("_compact")
            run = plans[key] = ops.eager_plan(x, self.packed) if compact is None else self._compact_plan(x, compact)
        return run(x, bias)

    # ---- compact CPU inference: keep the CPU kernels' layout only ----

    def compact_(self) -> bool:
        """Keep only wq's CPU kernel layout of the weight and free the checkpoint tensors (qweight, scales,
        zeros become shape-only meta tensors): about half the memory of a layer that ran on CPU. Every
        CPU call then runs on that layout; `packed`, state_dict() and save() rebuild the exact checkpoint
        tensors on demand, and any .to() / dtype cast or loading a state dict undoes it.
        Returns False (and changes nothing) where the CPU kernel cannot hold this layer."""
        from ..kernels import cpu_native

        if self.__dict__.get("_compact") is not None:
            return True
        if self.scheme.is_fp8 or self.qweight.device.type != "cpu" or not cpu_native.available():
            return False
        state = cpu_native.prepare_native(self.packed)
        if state is None:
            return False
        for k in ("qweight", "scales", "zeros"):
            t = self._buffers[k]
            self._buffers[k] = torch.empty(t.shape, dtype=t.dtype, device="meta")
        self.__dict__["_compact"] = state
        self.__dict__.pop("_plans", None)  # plans bound the checkpoint tensors
        return True

    def uncompact_(self) -> None:
        """Give the module its checkpoint tensors back (the inverse of compact_)."""
        state = self.__dict__.pop("_compact", None)
        if state is not None:
            self.__dict__.pop("_plans", None)
            pw = state.to_packed(self._shell())
            self._buffers.update(qweight=pw.qweight, scales=pw.scales, zeros=pw.zeros)

    def _shell(self) -> PackedWeight:
        return PackedWeight(qweight=self.qweight, scales=self.scales, zeros=self.zeros, scheme=self.scheme,
                            in_features=self.in_features, out_features=self.out_features, g_idx=self.g_idx)

    def _compact_plan(self, x: Tensor, state):
        """run(x, bias) for a compact layer: the CPU layout when dispatch picks a kernel that reads it,
        else (another kernel forced, or not on CPU) the checkpoint tensors rebuilt per call (slow, exact)."""
        shell = self._shell()  # meta tensors: scheme and shapes for dispatch
        if x.device.type == "cpu":
            kernel = dispatch.select(x, shell)
            if kernel.layout == "cpu_avx2":
                return kernel.bound(shell, state)
        return lambda x, bias: ops.quant_matmul(x, self.packed, bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        compact = self.__dict__.get("_compact")
        if compact is not None:
            pw = compact.to_packed(self._shell())
            destination.update({prefix + "qweight": pw.qweight, prefix + "scales": pw.scales,
                                prefix + "zeros": pw.zeros})

    def _load_from_state_dict(self, *args, **kwargs):
        self.uncompact_()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):  # deepcopy / pickle: plans bind this module's tensors, never copy them
        state = self.__dict__.copy()
        state.pop("_plans", None)
        return state

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not recast the stored format: fp16 scales (int schemes; a bf16 copy
        # would lose 3 mantissa bits and break reload equality), float8 weights and fp32 scales (FP8).
        # They only follow the device; the bias follows dtype and device as usual.
        self.uncompact_()  # the compact layout is CPU-only: moving or casting starts from the checkpoint tensors
        self.__dict__.pop("_plans", None)  # plans bind the old tensors (a streamed block moved to meta kept them)
        names = ("weight", "weight_scale") if self.scheme.is_fp8 else ("scales",)
        keep = {k: self._buffers.pop(k) for k in names if self._buffers.get(k) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            for k, t in keep.items():
                self._buffers[k] = t.to(fn(t.new_empty(0)).device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


def compact(model: nn.Module) -> tuple[int, int]:
    """QuantLinear.compact_ on every quantized layer of a CPU model: (layers compacted, layers kept as is)."""
    done = kept = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            if m.compact_():
                done += 1
            else:
                kept += 1
    return done, kept
