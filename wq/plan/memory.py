"""The peak memory a streamed run will need, estimated before any weight is loaded, next to what the
machine has. Every term comes from the checkpoint's headers, the model's config and the run's settings:

    process now        the interpreter with torch and transformers already imported (measured: VmRSS)
    outside            tensors outside the decoder blocks (embeddings, norm, head), in their stored dtype,
                       plus an fp32 copy of them while the calibration inputs are captured
    block              the largest decoder block in its stored dtype (data-free, and gptq or autoround on bf16/fp16
                       weights, computed in fp32 one Linear at a time) or in fp32 (other block algorithms, FP8
                       sources), its quantized copy, and the fp32 copy of its largest Linear
    algorithm state    block algorithms: what they hold per weight of the block's planned Linears while they
                       train (the algorithm's `state_bytes_per_weight`; autoround 3 bytes, 7 with several ranks)
    hessians           gptq: the block's input Hessians (fp32 [in, in] per distinct input), capped by the
                       hessian budget (several passes beyond it)
    calibration stream this rank's samples x seqlen x hidden x 4 bytes, x2 while a block's outputs are
                       recomputed (x3 and x4 for block algorithms: the full-precision stream and targets)
    write buffer       the final assembly's shard buffer (one part plus one shard)

It is an estimate: it says which term dominates, so the advice (--low-mem, more processes, a GPU
for the block) follows from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class MemoryEstimate:
    terms: dict[str, int] = field(default_factory=dict)  # bytes in host memory
    available: int | None = None  # bytes the machine can give (MemAvailable, or the cgroup limit)
    device_terms: dict[str, int] = field(default_factory=dict)  # bytes on the GPU (CUDA runs)
    device_available: int | None = None

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def device_total(self) -> int:
        return sum(self.device_terms.values())

    @property
    def fits(self) -> bool:
        host = self.available is None or self.total <= self.available
        dev = self.device_available is None or self.device_total <= self.device_available
        return host and dev

    def table(self) -> str:
        def fmt(terms, avail, what):
            rows = [f"  {k:<20} {v / 2**30:8.2f} GiB" for k, v in terms.items()]
            a = "unknown" if avail is None else f"{avail / 2**30:.2f} GiB"
            return [f"estimated peak {what}:", *rows,
                    f"  {'total':<20} {sum(terms.values()) / 2**30:8.2f} GiB (available now: {a})"]
        lines = fmt(self.terms, self.available, "memory")
        if self.device_terms:
            lines += fmt(self.device_terms, self.device_available, "GPU memory")
        return "\n".join(lines)

    def advice(self) -> str:
        host_over = self.available is not None and self.total > self.available
        terms, avail, what = ((self.terms, self.available, "memory") if host_over
                              else (self.device_terms, self.device_available, "GPU memory"))
        big = max(terms, key=terms.get) if terms else ""
        if big == "calibration stream":
            tips = ["--low-mem (the stream stays in host memory while the block runs on the GPU)" if what != "memory"
                    else "more processes (torchrun --nproc-per-node N: each holds 1/N of the stream)",
                    "fewer --nsamples or a shorter --seqlen"]
        elif big == "hessians":
            tips = ["a smaller --hessian-budget (more calibration passes per block, same result)"]
        else:
            tips = ["a machine with more memory", "a GPU for the block (--device cuda)"]
        need = sum(terms.values())
        return (f"the run needs about {need / 2**30:.1f} GiB of {what}, {(avail or 0) / 2**30:.1f} GiB are available; "
                f"the largest part is the {big} ({terms.get(big, 0) / 2**30:.1f} GiB): try " + "; or ".join(tips))


def available_bytes() -> int | None:
    """MemAvailable, capped by a cgroup memory limit when one is set."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        return None
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(f).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 2**60:
            used = 0
            for g in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
                try:
                    used = int(Path(g).read_text().strip())
                    break
                except (OSError, ValueError):
                    continue
            avail = min(avail or 2**62, int(raw) - used)
    return avail


def rss_now() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def backward_intermediates(algo, *, low_mem: bool) -> int:
    """Tensors of a block's widest Linear output a training block algorithm declares it holds at the peak of its
    backward (7 through autograd: a gated MLP's gate, up, activation, product and three gradients)."""
    low = getattr(algo, "backward_intermediates_low_mem", None)
    if low_mem and low is not None:
        return low
    return getattr(algo, "backward_intermediates", 7)


def training_footprint(algo, *, ranks: int, low_mem: bool, batch_size: int, seqlen: int) -> tuple[float, int]:
    """(state bytes per weight, samples per forward) a block algorithm class declares for this run: its state with
    one process or several, and under --low-mem, where it has a smaller-activation mode (autoround), that mode's
    larger state and at most `low_mem_tokens` tokens (whole samples, at least one) per forward."""
    state = getattr(algo, "state_bytes_per_weight_ranks" if ranks > 1 else "state_bytes_per_weight", 0.0)
    low = getattr(algo, "state_bytes_per_weight_low_mem", None)
    if low_mem and low is not None:
        return low, max(1, min(batch_size, getattr(algo, "low_mem_tokens", 0) // max(seqlen, 1)))
    return state, batch_size


def estimate_streamed(skeleton, plan: dict, *, calibrated: bool, block_algo: bool = False, nsamples: int = 0,
                      seqlen: int = 0, processes: int = 1, low_mem: bool = False, device: str = "cpu",
                      hessian_budget: int = 4 * 1024**3, write_buffer: int = 1024**3, reads_16bit: bool = False,
                      state_per_weight: float = 0.0, batch_size: int = 1, backward_widest: int = 7) -> MemoryEstimate:
    """What a streamed run of `plan` over `skeleton` (wq.loading.skeleton.Skeleton) will hold at its peak.
    reads_16bit / state_per_weight: a block algorithm's capabilities (wq.algorithms.base.Algorithm).
    batch_size: samples a block algorithm trains on at once (layer algorithms replay one sample at a time,
    wq.calib.microbatch). backward_widest: tensors of the widest Linear output a training block algorithm holds at the
    peak of its backward (backward_intermediates)."""
    from ..nn.surgery import linear_candidates

    reader = skeleton.reader
    prefix = skeleton.prefix + "."
    outside = sum(reader.nbytes(n) for n in reader.names() if not skeleton.names.from_hub(n).startswith(prefix))
    per_block: dict[int, int] = {}
    for n in reader.names():
        key = skeleton.names.from_hub(n)
        if key.startswith(prefix):
            i = int(key[len(prefix):].split(".", 1)[0])
            per_block[i] = per_block.get(i, 0) + reader.nbytes(n)
    block_stored = max(per_block.values(), default=0)
    elem = max(skeleton.dtype.itemsize, 1)
    import torch

    upcast = ((not block_algo or reads_16bit) and skeleton.dtype in (torch.bfloat16, torch.float16)
              and not getattr(reader, "fp8_block", None))  # wq.calib.upcast: 16-bit weights stay as stored
    block_fp32 = block_stored * 4 // elem if calibrated and not upcast else block_stored
    shapes = linear_candidates(skeleton.model)
    in_block = {n: shapes[n] for n in plan if n.startswith(prefix + "0.") and n in shapes}
    largest = max((i * o for i, o in in_block.values()), default=0) * 4
    quantized = block_stored // 3
    stream = acts = 0
    if calibrated:
        hidden = getattr(skeleton.config, "hidden_size", None) or getattr(skeleton.config, "n_embd", 0) or 0
        stream = -(-nsamples // max(processes, 1)) * seqlen * hidden * 4 * (4 if block_algo else 2)
        # a forward's widest fp32 intermediates (an MLP's gate, up and their product) for the samples it runs at once;
        # a block algorithm that trains (state to hold) holds them through a backward: through autograd the MLP's
        # gate, up, activation and product, and the gradients of three of them (7; measured on a hidden-2048 block,
        # 4 x 256 tokens: ~160 MiB at the peak of the MLP's backward against 7 x 22), fewer where the algorithm
        # fuses the MLP (backward_widest)
        at_once = max(batch_size, 1) if block_algo else 1
        widest = backward_widest if block_algo and state_per_weight else 3
        acts = at_once * seqlen * max((o for _, o in in_block.values()), default=0) * 4 * widest
    hessians = 0
    if calibrated and not block_algo:
        hessians = min(sum(i * i * 4 for i in sorted({i for i, _ in in_block.values()})), hessian_budget)
    on_gpu = device != "cpu"
    host = {"process now": rss_now(), "outside": outside + (outside * 4 // elem if calibrated else 0)}
    gpu: dict[str, int] = {}
    (gpu if on_gpu else host)["block"] = block_fp32 + quantized + largest
    if calibrated and block_algo and state_per_weight:
        (gpu if on_gpu else host)["algorithm state"] = int(state_per_weight * sum(i * o for i, o in in_block.values()))
    if hessians:
        (gpu if on_gpu else host)["hessians"] = hessians
    if acts:
        (gpu if on_gpu else host)["activations"] = acts
    if stream:
        (gpu if on_gpu and not low_mem else host)["calibration stream"] = stream
    host["write buffer"] = min(write_buffer, max(block_stored, 1))
    avail = available_bytes()
    if os.environ.get("WQ_MEMORY_AVAILABLE"):  # tests and what-if runs
        avail = int(float(os.environ["WQ_MEMORY_AVAILABLE"]))
    dev_avail = None
    if on_gpu:
        if torch.cuda.is_available():
            dev_avail = torch.cuda.mem_get_info(torch.device(device))[0]
    return MemoryEstimate(terms=host, available=avail, device_terms=gpu, device_available=dev_avail)
