"""Peak memory and CPU of autoround on one random Llama block (hidden 2048 by default), in this process.

Prints one JSON line: the peak RSS (VmHWM, reset after the setup) over the RSS at the start of autoround, and its
CPU seconds. Run each variant in a fresh process and several times; the machine's load goes with the figures.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python scripts/block_peak.py --mlp fused --mmap-threshold 1048576
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
import wq.algorithms.autoround as ar  # noqa: E402
from wq.scheme import QuantScheme  # noqa: E402


def _status(key: str) -> int:
    """A /proc/self/status field in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--scheme", default="W4G128")
    ap.add_argument("--mlp", choices=["autograd", "fused", "recompute"], default="fused",
                    help="autograd: the MLP's Linears one by one; fused: wq.algorithms.gated_mlp; recompute: fused, "
                         "gate and up recomputed in the backward (--low-mem's choice)")
    ap.add_argument("--mmap-threshold", type=int, default=0, help="glibc's M_MMAP_THRESHOLD in bytes (0: glibc's)")
    args = ap.parse_args()
    if args.mmap_threshold:
        ctypes.CDLL("libc.so.6").mallopt(-3, args.mmap_threshold)  # M_MMAP_THRESHOLD
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256))
    cfg._attn_implementation = "sdpa"
    block = LlamaDecoderLayer(cfg, 0).to(torch.bfloat16)  # stored weights in bf16, as a streamed run holds them
    x = torch.randn(args.samples, args.seqlen, args.hidden)
    kw = {"position_embeddings": LlamaRotaryEmbedding(cfg)(x, torch.arange(args.seqlen)[None]), "attention_mask": None}
    with torch.no_grad():
        ref = LlamaDecoderLayer(cfg, 0)
        ref.load_state_dict({k: v.float() for k, v in block.state_dict().items()})
        y = ar._block_out(ref(x, **kw))
        del ref
    plan = {n: QuantScheme.parse(args.scheme) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    if args.mlp == "autograd":
        ar._gated_mlps = lambda *a: {}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    start, t0 = _status("VmRSS"), time.process_time()
    ar.autoround_block(block, plan, [x], [kw], [y], iters=args.iters, lr=0.02, batch_size=args.samples,
                       recompute_mlp=args.mlp == "recompute")
    print(json.dumps({"mlp": args.mlp, "mmap_threshold": args.mmap_threshold, "start_mib": start,
                      "peak_over_start_mib": _status("VmHWM") - start, "cpu_s": round(time.process_time() - t0, 2),
                      "loadavg": os.getloadavg()}))


if __name__ == "__main__":
    main()
