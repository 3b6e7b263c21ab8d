"""The sequential block-by-block calibration pipeline, and the contract calibrated algorithms code against.

    quantize_calibrated(model, plan, algorithm, report, *, calib, tokenizer, device, progress)

called by wq.api.quantize_model when `algorithm.needs_calibration`. Steps:

1. Calibration samples (wq.calib.data): `nsamples` x `seqlen` token windows, split into batches of
   `batch_size`.
2. Capture the inputs of the first decoder block: a forward pre-hook on it records its hidden-state
   input and keyword arguments (attention mask, position_ids, position_embeddings...) and stops the
   forward with an exception; only the modules outside the blocks (embeddings, rotary) visit the
   compute device, cast to fp32.
3. For each block: move it to the compute device and cast it to fp32 (all calibration math is fp32,
   on CPU and CUDA alike); quantize its planned Linears (below); swap QuantLinear in for each
   (QuantLinear.from_packed); recompute the block's outputs with the quantized block, which become
   the next block's inputs; cast back to the model dtype and move back to where it lived. Only one
   block is on the compute device at a time. With `low_mem` the activations stay on CPU and each
   batch visits the device when used.
4. Resume: when `output` is given, after every finished block a checkpoint is written atomically
   (temp file + rename) into `<output>.partial/`: each finished block's state dict, the next block's
   input activations and state.json (the commit point). With `resume=True` a run restarts after the
   last finished block and produces the same tensors as an uninterrupted run; settings must match.
   `clear_checkpoint(output)` removes the directory once the model is saved.

Settings come from `algorithm.settings` (quantize_model's **algo_args; the CLI passes them):
    nsamples=128, seqlen=2048, seed=0, batch_size=8, low_mem=False, resume=False, output=None,
    expert_min_tokens=128 (an MoE expert the router sent fewer tokens gets the all-token Hessian),
    hessian_budget=4 GiB (a block's Hessians beyond it are accumulated in several passes)

Algorithm interface (wq.algorithms.base.Algorithm), by `granularity`:

- granularity = "layer" (gptq):
      quantize_weight(w: Tensor [out, in] fp32, scheme: QuantScheme, *, H: Tensor [in, in] fp32)
          -> QuantResult
  H = 2/n * sum_x x^T x over the n token rows x [in] that reached this Linear in the unquantized
  block (forward hooks; Linears fed the same tensor, q/k/v and gate/up, share one H object: never
  modify H in place), summed over the ranks. A MoE expert's Linears (QuantExperts: one nn.Linear per
  expert projection during calibration) see only the tokens routed to that expert. The pipeline
  shows `result.stats["loss"]` (else `result.error`) per Linear.

- granularity = "block" (autoround):
      quantize_block(block: nn.Module, plan: dict[str, QuantScheme], inputs: list[Tensor],
                     kwargs: list[dict], targets: list[Tensor]) -> dict[str, QuantResult]
  block: the decoder block, on the compute device, fp32, still with its nn.Linear modules (do not
  swap them yourself; restore any weight you modify in place). plan: names relative to the block
  ("self_attn.q_proj") -> scheme, only the Linears to quantize. inputs[j]: the block's hidden-state
  input for calibration batch j, fp32 [b, L, hidden] (produced by the already-quantized previous
  blocks); kwargs[j]: the other keyword arguments the block is called with for that batch (floating
  tensors fp32, on the compute device), so `block(inputs[j], **kwargs[j])` reproduces the model's call;
  targets[j]: what the unquantized model computes at this block's output for batch j: the unquantized
  block applied to the full-precision stream (inputs of the unquantized model), not to inputs[j], so
  the block also learns to undo earlier blocks' error. inputs/targets are on the compute device,
  or on CPU when `low_mem` is set: always `.to(device)` each batch before use. Return one QuantResult
  per plan entry; the pipeline swaps QuantLinear in, recomputes outputs and moves on.
  A block's output may be a tensor or a tuple (hidden states first): use `block_output(block(...))`.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import resource
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..algorithms.rtn import rtn_quantize
from ..heap import trim
from ..kernels.dispatch import exact_kernels
from ..nn import QuantExperts, QuantLinear, set_module
from ..scheme import QuantScheme
from .data import calibration_samples
from .microbatch import per_sample
from .upcast import UPCAST_EXACT, fp32_linears

log = logging.getLogger(__name__)

CALIB_DEFAULTS = {"nsamples": 128, "seqlen": 2048, "seed": 0, "batch_size": 8, "low_mem": False,
                  "resume": False, "output": None, "expert_min_tokens": 128, "hessian_budget": 4 * 1024**3}
# settings that do not change the result (resume/output/...): left out of the resume fingerprint
_NOT_ALGO = set(CALIB_DEFAULTS) - {"seed", "expert_min_tokens"}


class _StopForward(Exception):
    """Raised by the capture hook: the rest of the model is not needed."""


# ------------------------------------------------------------------------------------------ helpers
def block_output(out) -> Tensor:
    """Decoder blocks return a tensor (transformers >= 5) or a tuple with the hidden states first."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _replay(block: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
    """block(hidden) [B, T, d] -> its output [B, T, d], run a sample at a time (wq.calib.microbatch): 1/B of a
    batch's activations. The same math per row (a kernel may round differently at another M: the rows were
    bit for bit the batch's on this CPU at hidden 2048); streamed and in-memory runs share this path."""
    outs = [block_output(block(h, **kw)) for h, kw in per_sample(hidden, kwargs)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _to(obj, device=None, dtype=None):
    """Move (and cast floating) tensors inside nested tuples/lists/dicts."""
    if isinstance(obj, Tensor):
        return obj.to(device=device, dtype=dtype if (dtype is not None and obj.is_floating_point()) else None)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def find_blocks(model: nn.Module, plan: dict) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the one holding the most planned Linears."""
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and name:
            n = sum(1 for p in plan if p.startswith(name + "."))
            if n > best_n:
                best, best_n = (name, mod), n
    if best is None:
        raise ValueError("calibrated quantization needs a model with a list of decoder blocks (e.g. "
                         "model.layers); none holds the planned Linears. Use --algo rtn for this model")
    return best


def _cast_float(module: nn.Module, dtype: torch.dtype, keep: frozenset = frozenset()) -> None:
    """Cast floating parameters and buffers, leaving QuantLinear (fp16 scales, packed codes) and the weights of the
    modules in `keep` untouched."""
    for mod in module.modules():
        if isinstance(mod, QuantLinear):
            continue
        for name, p in mod.named_parameters(recurse=False):
            if mod in keep and name == "weight":
                continue
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in mod.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                mod._buffers[name] = b.to(dtype)


def _float_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _peak_memory(dev: torch.device) -> int:
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB; the whole process


# ------------------------------------------------------------------------------------------ capture
@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, prefix: str, batches: list[Tensor],
                         device: torch.device, store: torch.device) -> tuple[list[Tensor], list[dict]]:
    """Run the model up to the first block for each batch: its fp32 inputs (on `store`) and kwargs (on device)."""
    inputs: list[Tensor] = []
    kwargs: list[dict] = []

    def hook(module, args, kw):
        if len(args) > 1:  # e.g. GPT-2: block(hidden, past_key_values, cache_position, attention_mask, ...)
            names = list(inspect.signature(module.forward).parameters)[1:]
            if len(names) < len(args) - 1 or any(n in kw for n in names[: len(args) - 1]):
                raise NotImplementedError(f"{prefix}.0 is called with {len(args)} positional arguments that do not "
                                          f"map onto its signature; wq.calib replays blocks as block(hidden, **kwargs)")
            kw = {**kw, **dict(zip(names, args[1:]))}
        x = args[0] if args else kw.pop("hidden_states")
        inputs.append(x.detach().float().to(store))
        kw = {k: v for k, v in kw.items() if k not in ("past_key_value", "past_key_values", "use_cache")}
        kwargs.append(_to(kw, device, torch.float32))
        raise _StopForward

    # the modules that run before the first block (embeddings, rotary tables) visit the device, in fp32 except
    # embedding tables (a lookup is exact in any dtype, and an fp32 copy of a 128k-row table costs gigabytes);
    # modules the forward never reaches (final norm, head) are never copied. Originals are put back after.
    saved = []
    seen = {id(t) for t in list(blocks.parameters()) + list(blocks.buffers())}  # blocks stay put

    def visit(mod, args, kw):
        keep_dtype = isinstance(mod, nn.Embedding)
        for p in list(mod._parameters.values()):
            if p is not None and id(p) not in seen:  # tied weights appear twice: move once
                seen.add(id(p))
                saved.append((p, p.data))
                p.data = p.data.to(device, None if keep_dtype or not p.is_floating_point() else torch.float32)
        for name, b in list(mod._buffers.items()):
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                saved.append((mod, name, b))
                mod._buffers[name] = _to(b, device, torch.float32)

    in_blocks = {id(m) for m in blocks.modules()}
    outside = [m for m in model.modules() if id(m) not in in_blocks]
    handles = [m.register_forward_pre_hook(visit, with_kwargs=True) for m in outside]
    # an embedding's rows come out in fp32, as if the table had been cast: what follows runs in fp32
    handles += [m.register_forward_hook(lambda m, a, out: out.float() if out.is_floating_point() else out)
                for m in outside if isinstance(m, nn.Embedding)]
    handles.append(blocks[0].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
            else:
                raise RuntimeError(f"the forward never reached {prefix}.0; cannot capture calibration inputs")
    finally:
        for h in handles:
            h.remove()
        for item in reversed(saved):
            if len(item) == 2:
                item[0].data = item[1]
            else:
                item[0]._buffers[item[1]] = item[2]
    return inputs, kwargs


# ------------------------------------------------------------------------------------------ resume
class Checkpoint:
    """`<output>.partial/`: state.json (commit point), block_NNNN.safetensors (a finished block's state dict),
    acts_NNNN[.rR].safetensors (the next block's inputs; one file per rank under torchrun) and, for a
    streamed run, outside.safetensors. Only rank 0 writes the shared files; every rank writes its own
    activations, then all wait for each other before rank 0 commits state.json."""

    def __init__(self, output: str | os.PathLike, fingerprint: dict):
        from .distributed import rank_world

        self.dir = Path(str(output).rstrip("/") + ".partial")
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.rank, self.world = rank_world()

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def state(self) -> dict | None:
        f = self.dir / "state.json"
        return json.loads(f.read_text()) if f.exists() else None

    def reset(self) -> None:
        if self.rank == 0:
            if self.dir.exists():
                log.info("removing the previous partial run %s (pass --resume to continue it instead)", self.dir)
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True)
        self._barrier()

    def _atomic(self, path: Path, write) -> None:
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        os.replace(tmp, path)

    def _acts(self, index: int) -> Path:
        return self.dir / (f"acts_{index:04d}.safetensors" if self.world == 1 else f"acts_{index:04d}.r{self.rank}.safetensors")

    def save(self, index: int, block: nn.Module, hidden: list[Tensor], layers: dict, done: bool,
             fp_hidden: list[Tensor] | None = None) -> None:
        """Block `index` is finished: its state dict, the inputs of block index+1 (quantized stream, and
        the full-precision stream for block algorithms), then state.json."""
        if not done:
            acts = {f"h{j}": h.detach().cpu().contiguous() for j, h in enumerate(hidden)}
            acts.update({f"f{j}": h.detach().cpu().contiguous() for j, h in enumerate(fp_hidden or [])})
            self._atomic(self._acts(index + 1), lambda p: save_file(acts, str(p)))
        if self.rank == 0:
            sd = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
            self._atomic(self.dir / f"block_{index:04d}.safetensors", lambda p: save_file(sd, str(p)))
        self._barrier()  # every rank's activations are on disk before the commit point moves
        if self.rank == 0:
            state = {"version": 1, "fingerprint": self.fingerprint, "next_block": index + 1, "done": done,
                     "layers": layers}
            self._atomic(self.dir / "state.json", lambda p: p.write_text(json.dumps(state, indent=1)))
        old = self._acts(index)
        if old.exists():
            old.unlink()

    def save_outside(self, model: nn.Module, prefix: str) -> None:
        """A streamed run's tensors outside the blocks (tied tensors once), for the final assembly."""
        if self.rank != 0:
            return
        seen, sd = set(), {}
        for k, v in model.state_dict().items():
            if k.startswith(prefix + ".") or v.device.type == "meta":
                continue
            ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            if ident in seen:
                continue  # a tied head: the embedding holds it
            seen.add(ident)
            sd[k] = v.detach().cpu().contiguous()
        self._atomic(self.dir / "outside.safetensors", lambda p: save_file(sd, str(p)))

    def load_block(self, index: int) -> dict[str, Tensor]:
        return load_file(str(self.dir / f"block_{index:04d}.safetensors"))

    def load_acts(self, index: int) -> tuple[list[Tensor], list[Tensor] | None]:
        """(quantized-stream inputs, full-precision-stream inputs or None) of block `index`, this rank's."""
        d = load_file(str(self._acts(index)))
        n = sum(k.startswith("h") for k in d)
        fp = [d[f"f{j}"] for j in range(n)] if "f0" in d else None
        return [d[f"h{j}"] for j in range(n)], fp


def clear_checkpoint(output: str | os.PathLike | None) -> None:
    """Remove `<output>.partial/` (call after the quantized model is saved)."""
    if output:
        d = Path(str(output).rstrip("/") + ".partial")
        if d.exists():
            shutil.rmtree(d)


def _restore_block(block: nn.Module, names: dict[str, QuantScheme], sd: dict[str, Tensor]) -> None:
    """Swap in empty QuantLinear per planned Linear, then load the finished block's saved state dict."""
    for rel, scheme in names.items():
        lin = block.get_submodule(rel)
        bias = sd.get(f"{rel}.bias")
        q = QuantLinear(lin.in_features, lin.out_features, scheme, bias=bias is not None,
                        act_order=f"{rel}.g_idx" in sd, bias_dtype=bias.dtype if bias is not None else torch.bfloat16)
        set_module(block, rel, q)
    block.load_state_dict(sd, strict=True)


# ------------------------------------------------------------------------------------------ pipeline
def quantize_calibrated(model: nn.Module, plan: dict[str, QuantScheme], algorithm, report, *, calib=None,
                        tokenizer=None, device=None, progress: bool = True, source=None) -> None:
    """Quantize `plan`'s Linears block by block with a calibrated `algorithm`; fills `report` (see module doc).

    source: a wq.loading.skeleton.Skeleton when streaming: `model` is its meta-device model with the parts
    outside the blocks loaded; each block is read from the shards when reached, staged in
    `<output>.partial/` when finished and released (output is then required)."""
    from ..api import LayerReport, _bias_bytes
    from ..nn.surgery import materialize
    from .distributed import rank_world, share

    s = {**CALIB_DEFAULTS, **{k: v for k, v in algorithm.settings.items() if k in CALIB_DEFAULTS}}
    dev = torch.device(device) if device else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    store = torch.device("cpu") if s["low_mem"] else dev
    granularity = getattr(algorithm, "granularity", "layer")
    if granularity not in ("layer", "block"):
        raise ValueError(f"{algorithm.name}: granularity must be 'layer' or 'block', not {granularity!r}")

    prefix, blocks = (source.prefix, source.blocks) if source is not None else find_blocks(model, plan)
    outside = {n: sch for n, sch in plan.items() if not n.startswith(prefix + ".")}
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    all_samples = calibration_samples(calib, tokenizer, nsamples=s["nsamples"], seqlen=s["seqlen"], seed=s["seed"],
                                      max_length=max_len)  # [n, L], the same on every rank
    rank, world = rank_world()
    mine = share(all_samples.shape[0], rank, world)  # this rank's contiguous share
    samples = all_samples[mine.start:mine.stop]
    if samples.shape[0] == 0:
        raise ValueError(f"rank {rank} of {world} got no calibration sample ({all_samples.shape[0]} in all): "
                         f"use --nsamples >= {world} or fewer processes")
    batches = list(samples.split(max(1, s["batch_size"])))
    log.info("calibrating %s on %d samples x %d tokens, %d blocks, device %s%s", algorithm.name,
             all_samples.shape[0], all_samples.shape[1], len(blocks), dev,
             f"; rank {rank} of {world} takes samples {mine.start}..{mine.stop - 1}" if world > 1 else "")
    if source is not None and not s["output"]:
        raise ValueError("a streamed run stages finished blocks on disk: give it an output directory")

    ckpt, start = None, 0
    if s["output"]:
        fp = {"algo": algorithm.name, "plan": {n: str(v) for n, v in plan.items()},
              "settings": {k: v for k, v in sorted(algorithm.settings.items()) if k not in _NOT_ALGO},
              "calib": calib if isinstance(calib, (str, type(None))) else "<tokens>",
              "samples": list(all_samples.shape), "samples_sum": int(all_samples.sum()), "blocks": len(blocks),
              "processes": world, "streamed": source is not None}
        ckpt = Checkpoint(s["output"], fp)
        state = ckpt.state() if s["resume"] else None
        if s["resume"] and state is None:
            log.warning("--resume: no partial run in %s; starting from the first block", ckpt.dir)
        if state is not None:
            if state["fingerprint"] != ckpt.fingerprint:
                from ..writing.output import resume_mismatch

                raise resume_mismatch(ckpt.dir, state["fingerprint"], ckpt.fingerprint)  # names the flags
            start = state["next_block"]
            for i in range(start if source is None else 0):  # streamed: finished blocks stay staged on disk
                _restore_block(blocks[i], _names_in(plan, f"{prefix}.{i}"), ckpt.load_block(i))
            for name, r in state["layers"].items():
                report.layers[name] = LayerReport(**r)
            log.info("resuming from block %d/%d (%s)", start, len(blocks), ckpt.dir)
        else:
            ckpt.reset()

    hidden, kwargs = capture_block_inputs(model, blocks, prefix, batches, dev, store)
    if source is not None:  # streamed: the tensors outside the blocks are not used again until the end
        source.release_outside()
    # Block algorithms learn to reproduce the *unquantized model's* hidden states: their targets come
    # from a full-precision stream carried beside the quantized one, so each block can also correct
    # the error earlier quantized blocks left in its inputs (as AutoRound does). Costs one more set of
    # activations, no extra forward: the fp block's outputs are both the targets and the next fp inputs.
    fp_hidden = list(hidden) if granularity == "block" else None
    if 0 < start < len(blocks):
        acts, fp_acts = ckpt.load_acts(start)
        hidden = [h.to(store) for h in acts]
        if fp_hidden is not None:
            fp_hidden = [h.to(store) for h in (fp_acts or acts)]

    bar = tqdm(range(start, len(blocks)), desc=f"{algorithm.name} {report.scheme}", unit="block",
               disable=not progress, initial=start, total=len(blocks))
    for i in bar:
        t0 = time.perf_counter()
        bname = f"{prefix}.{i}"
        # layer algorithms (and block algorithms that declare it) get the planned Linears' weights in their
        # bf16/fp16 storage and compute in fp32 (wq.calib.upcast: exact, half the block's memory); other block
        # algorithms train on an fp32 block
        dtype = source.dtype if source is not None else _float_dtype(blocks[i])
        keep16 = ((granularity == "layer" or algorithm.reads_16bit_weights) and dtype in UPCAST_EXACT
                  and not (source is not None and source.reader.fp8_block))  # FP8: dequantized straight to fp32
        if source is not None:  # read this block from the shards, on the compute device
            source.load_block(i, dev, dtype if keep16 else torch.float32)
            materialize(model, plan, within=bname)  # fused experts / Conv1D of this block -> Linears
        block = blocks[i]
        names = _names_in(plan, bname)
        home = next(block.parameters()).device
        block.to(dev)
        before = {rel: block.get_submodule(rel) for rel in names}
        kept = frozenset(before.values()) if keep16 else frozenset()
        _cast_float(block, torch.float32, keep=kept)
        if granularity == "layer":
            with fp32_linears(kept):
                results, seconds = _quantize_layers(block, names, algorithm, hidden, kwargs, dev,
                                                    min_tokens=int(s["expert_min_tokens"]),
                                                    budget=int(s["hessian_budget"]),
                                                    spill_dir=str(ckpt.dir) if ckpt is not None else None)
        else:
            with fp32_linears(kept):
                with torch.no_grad():  # the unquantized block on the full-precision stream
                    targets = [block_output(block(h.to(dev), **kw)).to(store) for h, kw in zip(fp_hidden, kwargs)]
                t = time.perf_counter()
                results = algorithm.quantize_block(block, names, hidden, kwargs, targets)
            fp_hidden = targets  # inputs of the next unquantized block
            seconds = {rel: (time.perf_counter() - t) / max(len(names), 1) for rel in names}
        missing = set(names) - set(results)
        if missing:
            raise RuntimeError(f"{algorithm.name}.quantize_block returned no result for {sorted(missing)}")
        losses = _install(block, bname, names, before, results, seconds, dtype, report)
        del before, results  # the original Linears (their weights) go now, not when the next block replaces them
        # the next block sees what the quantized model computes, through exact kernels only: which kernel
        # is fastest at this seqlen x batch (e.g. int8-rounded activations on CPU) must not change the result
        with torch.no_grad(), exact_kernels():
            hidden = [_replay(block, h.to(dev), kw).to(store) for h, kw in zip(hidden, kwargs)]
        _cast_float(block, dtype)
        block.to(home)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if ckpt is not None:
            ckpt.save(i, block, hidden, {n: vars(r) for n, r in report.layers.items()}, done=i == len(blocks) - 1,
                      fp_hidden=fp_hidden)
        if source is not None:
            source.release_block(i)
        dt = time.perf_counter() - t0
        log.info("block %d/%d %.1fs  %s", i + 1, len(blocks), dt,
                 "  ".join(f"{rel.split('.')[-1]} {v:.3g}" for rel, v in losses.items()))
        bar.set_postfix(block_s=f"{dt:.1f}", max_loss=f"{max(losses.values(), default=0):.3g}")

    if source is not None:
        source.load_outside("cpu")  # read again: staged below, and an overridden lm_head is quantized
    for name, scheme in outside.items():  # e.g. an overridden lm_head: not inside a block, no observed inputs
        log.warning("%s is outside the decoder blocks: quantized with rtn, not %s", name, algorithm.name)
        lin = model.get_submodule(name)
        t = time.perf_counter()
        res = rtn_quantize(lin.weight.detach(), scheme)
        set_module(model, name, QuantLinear.from_packed(res.packed.to(lin.weight.device), lin.bias))
        report.layers[name] = LayerReport(
            scheme=str(scheme), error=res.error, seconds=time.perf_counter() - t,
            bytes_before=lin.weight.numel() * lin.weight.element_size() + _bias_bytes(lin),
            bytes_after=res.packed.nbytes() + _bias_bytes(lin), stats={"fallback": "rtn"})
    if source is not None:
        ckpt.save_outside(model, prefix)
    report.peak_memory_bytes = _peak_memory(dev)


def _install(block: nn.Module, bname: str, names: dict[str, QuantScheme], before: dict[str, nn.Module],
             results: dict, seconds: dict[str, float], dtype: torch.dtype, report) -> dict[str, float]:
    """Swap a QuantLinear in for each quantized Linear of the block and record its report line -> {rel: loss}."""
    from ..api import LayerReport, _bias_bytes

    losses = {}
    for rel, res in results.items():
        lin = before[rel]
        bias = None if lin.bias is None else lin.bias.detach().to(dtype)
        set_module(block, rel, QuantLinear.from_packed(res.packed, bias))
        report.layers[f"{bname}.{rel}"] = LayerReport(
            scheme=str(names[rel]), error=res.error, seconds=seconds[rel],
            bytes_before=lin.weight.numel() * dtype.itemsize + _bias_bytes(lin),
            bytes_after=res.packed.nbytes() + _bias_bytes(lin), stats=_plain(res.stats))
        losses[rel] = float(res.stats.get("loss", res.error))
    return losses


def _names_in(plan: dict[str, QuantScheme], bname: str) -> dict[str, QuantScheme]:
    return {n[len(bname) + 1:]: sch for n, sch in plan.items() if n.startswith(bname + ".")}


def _plain(stats: dict) -> dict:
    """JSON-able stats (the checkpoint's state.json and wq.json hold them)."""
    return {k: (float(v) if isinstance(v, Tensor) else v) for k, v in stats.items()}


def _hessian_groups(block: nn.Module, names: dict[str, QuantScheme], budget: int) -> list[dict[str, QuantScheme]]:
    """Split the block's Linears into groups whose Hessians fit in `budget` bytes (one calibration pass
    each). Linears of one parent module stay together (q/k/v, an expert's gate/up share one input)."""
    parents: dict[str, dict[str, QuantScheme]] = {}
    for rel, scheme in names.items():
        parents.setdefault(rel.rpartition(".")[0], {})[rel] = scheme
    groups: list[dict[str, QuantScheme]] = [{}]
    used = 0
    for members in parents.values():
        need = sum(block.get_submodule(rel).in_features ** 2 * 4 for rel in members)  # upper bound: none shared
        if groups[-1] and used + need > budget:
            groups.append({})
            used = 0
        groups[-1].update(members)
        used += need
    return groups


def _experts_of(block: nn.Module, rels) -> dict[str, QuantExperts]:
    """{relative path: QuantExperts} for the experts modules holding any of `rels`."""
    out = {}
    for rel in rels:
        path = rel.rsplit(".", 2)[0] if rel.count(".") >= 2 else ""
        if path and path not in out:
            mod = block.get_submodule(path)
            if isinstance(mod, QuantExperts):
                out[path] = mod
    return out


@torch.no_grad()
def _quantize_layers(block: nn.Module, names: dict[str, QuantScheme], algorithm, hidden: list[Tensor],
                     kwargs: list[dict], dev: torch.device, *, min_tokens: int = 128,
                     budget: int = 4 * 1024**3, spill_dir: str | None = None):
    """Layer granularity: accumulate each Linear's Hessian over the calibration batches, then quantize.

    MoE experts: each expert's Linears see only the tokens the router sends them. An expert that got
    fewer than `min_tokens` tokens (summed over ranks) is quantized with the Hessian of every token
    instead (gate/up: the experts module's input; down: that expert's activation of every token, one
    more pass), named in its stats. Linears are taken in groups whose Hessians fit in `budget` bytes.
    A Hessian's last Linear gets it as scratch (H_owned: gptq factorizes it in place, spilling a copy to
    `spill_dir`, the run's disk) instead of holding a second [in, in] matrix.
    """
    results, seconds = {}, {}
    groups = _hessian_groups(block, names, budget)
    for gi, group in enumerate(groups):
        H, count, alias = _accumulate(block, group, hidden, kwargs, dev)
        fallback = _expert_fallbacks(block, group, H, count, alias, hidden, kwargs, dev, min_tokens)
        trim()  # the calibration forwards' activations are freed: their pages go back before gptq's work
        hessian = {}
        for rel in group:
            if rel not in alias and rel not in fallback:
                raise RuntimeError(f"{rel} saw no input during calibration (is it used in the block's forward?)")
            # [in, in]; algorithms must not modify it in place (it may be shared)
            hessian[rel] = fallback[rel][0] if rel in fallback else H[alias[rel]]
        notes = {rel: desc for rel, (_, desc) in fallback.items()}
        del H, fallback  # `hessian` holds the only references: each Hessian is freed once its last Linear is done
        for rels in _batches(block, group, algorithm):
            t = time.perf_counter()
            ws = [block.get_submodule(rel).weight.detach() for rel in rels]  # [out, in] each, as stored (bf16/fp32)
            many = (algorithm.quantize_weights(ws, group[rels[0]], Hs=[hessian[r] for r in rels])
                    if len(rels) > 1 else None)
            if many is None:
                many = [algorithm.quantize_weight(w, group[rel], H=hessian[rel], **_scratch(algorithm, hessian, rel, spill_dir))
                        for w, rel in zip(ws, rels)]
            dt = (time.perf_counter() - t) / len(rels)
            for rel, res in zip(rels, many):
                if rel in alias or rel in notes:
                    res.stats["tokens"] = count.get(alias.get(rel), 0)
                if rel in notes:
                    res.stats["hessian"] = notes[rel]
                results[rel] = res
                seconds[rel] = dt
            del ws, many
            for rel in rels:
                del hessian[rel]
                if gi == len(groups) - 1:  # no calibration forward of this block is left to need it
                    _drop_weight(block.get_submodule(rel))
            trim()  # the layer's temporaries go back to the OS before the next (larger) one
    return results, seconds


def _drop_weight(lin: nn.Module) -> None:
    """Free a quantized Linear's original weight before the block's next Linear is quantized (its QuantLinear
    replaces it once the block is done): a meta tensor of the same shape and dtype keeps what the report
    reads (numel, itemsize). Llama's q..up_proj are 64 MiB of a hidden-2048 block while down_proj, the
    largest Hessian, is quantized."""
    w = lin.weight
    lin.weight = nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"), requires_grad=False)


def _scratch(algorithm, hessian: dict[str, Tensor], rel: str, spill_dir: str | None) -> dict:
    """For an algorithm that declares `consumes_hessian`: H_owned (no other Linear still to be quantized shares
    rel's Hessian, so it may be overwritten) and where to spill it."""
    if not getattr(algorithm, "consumes_hessian", False):
        return {}
    return {"H_owned": not any(hessian[o] is hessian[rel] for o in hessian if o != rel), "spill_dir": spill_dir}


def _batches(block: nn.Module, group: dict[str, QuantScheme], algorithm, max_bytes: int = 512 * 1024**2):
    """The order the group's Linears are quantized in: MoE expert projections of one shape and scheme
    together (for an algorithm with `quantize_weights`, one batched call per bucket of about `max_bytes`
    of Hessians), everything else one at a time."""
    if not hasattr(algorithm, "quantize_weights"):
        return [[rel] for rel in group]
    experts = set(_experts_of(block, group))
    buckets: dict[tuple, list[list[str]]] = {}
    out: list[list[str]] = []
    for rel in group:
        if rel.rsplit(".", 2)[0] not in experts:
            out.append([rel])
            continue
        lin = block.get_submodule(rel)
        key = (lin.in_features, lin.out_features, str(group[rel]), rel.rsplit(".", 1)[1])
        cap = max(1, max_bytes // (lin.in_features ** 2 * 4 * 3))
        lists = buckets.setdefault(key, [[]])
        if len(lists[-1]) >= cap:
            lists.append([])
        lists[-1].append(rel)
    for lists in buckets.values():
        out.extend(lists)
    return out


def _accumulate(block: nn.Module, names: dict[str, QuantScheme], hidden: list[Tensor], kwargs: list[dict],
                dev: torch.device):
    """One pass over the calibration batches, a sample at a time (wq.calib.microbatch):
    H[owner] = 2/n sum x^T x (summed over ranks), n, aliases."""
    H: dict[str, Tensor] = {}  # one accumulator per distinct input: q/k/v (and gate/up) share theirs
    count: dict[str, int] = {}
    alias: dict[str, str] = {}  # Linear -> the Linear whose accumulator holds its input
    last: dict[tuple, tuple] = {}  # input identity in the current batch -> (first Linear that saw it, input)

    def make_hook(rel):
        def hook(module, args, out):
            inp = args[0]
            key = (inp.data_ptr(), tuple(inp.shape), inp._version)
            owner = last.setdefault(key, (rel, inp))[0]  # holding inp: its address cannot be reused meanwhile
            if alias.setdefault(rel, owner) != owner:
                raise RuntimeError(f"{rel}: its input is shared differently across calibration batches")
            if owner != rel:
                return
            x = inp.detach().reshape(-1, inp.shape[-1]).float()  # [tokens, in]
            if rel not in H:
                H[rel] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                count[rel] = 0
            H[rel].addmm_(x.t(), x)
            count[rel] += x.shape[0]
        return hook

    handles = [block.get_submodule(rel).register_forward_hook(make_hook(rel)) for rel in names]
    try:
        for h, kw in zip(hidden, kwargs):
            for hs, kws in per_sample(h.to(dev), kw):  # sums over tokens: 1/B of a batch's activations
                last.clear()
                block(hs, **kws)
    finally:
        for hd in handles:
            hd.remove()
        last.clear()
    _reduce_over_ranks(block, H, count, alias)
    for rel in list(H):
        if count[rel]:
            H[rel].mul_(2.0 / count[rel])  # [in, in]
    return H, count, alias


def _reduce_over_ranks(block: nn.Module, H: dict[str, Tensor], count: dict[str, int], alias: dict[str, str]) -> None:
    """Sum Hessians and token counts over the ranks (each rank calibrated on its share of the samples).
    Which Linears share an input is structural, but a rank that routed no token to an expert never saw
    its Linears: the aliases are merged over the ranks first, so every rank reduces the same tensors in
    the same order (a missing accumulator joins as zeros)."""
    from .distributed import all_reduce_sum_, rank_world

    world = rank_world()[1]
    if world == 1:
        return
    maps: list[dict] = [{} for _ in range(world)]
    torch.distributed.all_gather_object(maps, dict(alias))
    for m in maps:
        for rel, owner in m.items():
            alias.setdefault(rel, owner)
    for owner in sorted(set(alias.values())):
        if owner not in H:
            k = block.get_submodule(owner).in_features
            H[owner] = torch.zeros(k, k, device=next(iter(H.values())).device if H else None)
            count[owner] = 0
        n = torch.tensor([float(count[owner])], dtype=torch.float64)
        all_reduce_sum_(n)
        count[owner] = int(n.item())
        all_reduce_sum_(H[owner])


def _expert_fallbacks(block, names, H, count, alias, hidden, kwargs, dev, min_tokens: int) -> dict:
    """{rel: (Hessian, note)} for expert Linears that saw fewer than `min_tokens` tokens."""
    experts = _experts_of(block, names)
    if not experts:
        return {}
    low = [rel for rel in names if rel.rsplit(".", 2)[0] in experts and count.get(alias.get(rel), 0) < min_tokens]
    if not low:
        return {}
    # one more pass: every token's input to each experts module (for gate/up), and each low expert's
    # down_proj input computed from every token (the activation it would see if routed everything)
    want_down = {(rel.rsplit(".", 2)[0], int(rel.rsplit(".", 2)[1])) for rel in low if rel.endswith("down_proj")}
    acc: dict[tuple, list] = {}

    def add(key, x):
        x = x.reshape(-1, x.shape[-1]).float()
        if key not in acc:
            acc[key] = [torch.zeros(x.shape[1], x.shape[1], device=x.device), 0]
        acc[key][0].addmm_(x.t(), x)
        acc[key][1] += x.shape[0]

    def make_hook(path, mod):
        def hook(module, args, kw):
            x = args[0] if args else kw["hidden_states"]  # [T, H] (dense protocol: [E*T, H])
            if mod.layout.protocol == "dense":
                x = x.view(mod.num_experts, -1, x.shape[-1])
            flat = x.reshape(-1, x.shape[-1])
            if mod.layout.protocol == "dense":  # rows not routed to an expert are zero there: not tokens
                flat = flat[flat.abs().amax(-1) > 0]
            add((path, None), flat)
            for p, e in want_down:
                if p == path:
                    add((path, e), mod.down_input(e, x[e] if mod.layout.protocol == "dense" else x))
        return hook

    handles = [mod.register_forward_pre_hook(make_hook(path, mod), with_kwargs=True) for path, mod in experts.items()]
    try:
        for h, kw in zip(hidden, kwargs):
            block(h.to(dev), **kw)
    finally:
        for hd in handles:
            hd.remove()
    from .distributed import all_reduce_sum_

    out = {}
    for key in sorted(acc, key=str):
        Hk, n = acc[key]
        nt = torch.tensor([float(n)], dtype=torch.float64)
        all_reduce_sum_(nt)
        all_reduce_sum_(Hk)
        acc[key] = [Hk.mul_(2.0 / max(nt.item(), 1)), int(nt.item())]
    for rel in low:
        path, e, proj = rel.rsplit(".", 2)
        seen = count.get(alias.get(rel), 0)
        Hk, n = acc[(path, int(e))] if proj == "down_proj" else acc[(path, None)]
        out[rel] = (Hk, f"all {n} tokens (the router sent this expert {seen} < {min_tokens})")
        log.info("%s: the router sent it %d tokens (< %d); using the Hessian of all %d tokens", rel, seen,
                 min_tokens, n)
    return out
