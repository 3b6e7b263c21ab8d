"""CPU inference benchmark: wq's CPU kernels vs dense fp32/bf16 F.linear and the peers, side by side.

Every number is a ratio measured in one process with the candidates interleaved repetition by
repetition (the machine may be shared); the table shows the median over repetitions of
dense_time / candidate_time, where "dense" is the faster of fp32 and bf16 in that repetition.

    python scripts/bench_cpu.py --part layers --threads 1 2 --out docs/cpu_bench
    python scripts/bench_cpu.py --part decode --out docs/cpu_bench

Parts:
  layers  per-layer matmul for M rows on the default model's shapes and Llama-3.2-1B shapes, each
          scheme through the automatic dispatch and through each CPU kernel that can run it, plus
          the peers where installed and their shape rules allow: auto-round's torch QuantLinear
          (`autoround_torch`) and GPTQModel's (`gptqmodel_torch`), both up to --peer-max-m, and
          auto-round's compiled CPU kernel library (`pip install auto-round-lib`, its "ark" QuantLinear:
          `autoround_ark`, 2/4/8-bit, K % G == 0). Each peer's output is checked against the reference
          first; a wrong one is logged and not timed.
  decode  greedy decode tokens/s of the real SmolLM2-135M (RTN-quantized) and of a Llama-1B-shaped
          model with random weights (fewer layers/vocab by default, see flags), dense fp32 and bf16
          vs each scheme, and each scheme through the ark peer where it runs (`<scheme>/ark`); plus
          the bytes the weights occupy (parameters, buffers, kernel caches).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from wq.kernels import KERNELS, force_kernel, select  # noqa: E402
from wq.kernels.dispatch import exact_kernels  # noqa: E402
from wq.kernels.reference import reference_matmul  # noqa: E402
from wq.nn.quant_linear import QuantLinear  # noqa: E402
from wq.packing import PackedWeight, pack  # noqa: E402
from wq.scheme import QuantScheme  # noqa: E402

log = logging.getLogger("bench_cpu")

SHAPES = {  # (out, in)
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
    "llama1b": [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)],
}
SCHEMES = ["W4G128", "W3G128", "W2G128", "W8", "W4G-1"]
CPU_KERNELS = ["cpu_avx2_i8", "cpu_avx2", "cpu_avx2_dq", "aten_int4", "aten_int8"]


def random_packed(out_f: int, in_f: int, scheme: str, seed: int = 0) -> PackedWeight:
    s = QuantScheme.parse(scheme)
    g = torch.Generator().manual_seed(seed)
    ng, maxq = s.n_groups(in_f), 2**s.bits - 1
    q = torch.randint(0, maxq + 1, (out_f, in_f), generator=g)
    scale = (torch.rand(out_f, ng, generator=g) + 0.5) * (0.04 / maxq)  # weights of about +-0.02
    zero = torch.full((out_f, ng), 2 ** (s.bits - 1)) if s.sym else torch.randint(0, maxq + 1, (out_f, ng), generator=g)
    return PackedWeight.from_codes(q, scale, zero, s)


def peer_autoround(pw: PackedWeight):
    """auto-round's torch QuantLinear (dequantizes the whole weight per call) with our tensors, or None."""
    try:
        from auto_round_extension.torch.qlinear_torch import QuantLinear as ARQuantLinear
    except ImportError as e:
        log.warning("auto-round torch QuantLinear unavailable: %s", e)
        return None
    s, k, n = pw.scheme, pw.in_features, pw.out_features
    if k % 32 or n % 32 or (s.group_size != -1 and k % s.group_size):
        return None  # its shapes assume K % G == 0 and 32-aligned K, N
    layer = ARQuantLinear(s.bits, s.group_size, k, n, bias=False)
    layer.qweight, layer.scales = pw.qweight.clone(), pw.scales.clone()
    layer.qzeros = pack(pw.zeros.to(torch.int32), s.bits, dim=1)  # exact zeros: this class adds no +1
    return layer


def peer_ark(pw: PackedWeight):
    """auto-round-lib's "ark" CPU QuantLinear (compiled kernels, fp32 compute on CPU) with our tensors, or
    None where it is not installed or cannot take the scheme / shape (3-bit, K % G != 0)."""
    try:
        from auto_round_kernel.qlinear import QuantLinear as ArkQuantLinear
    except ImportError as e:
        if "ark" not in _warned:
            _warned.add("ark")
            log.warning("auto-round-lib (ark) unavailable: %s", e)
        return None
    s, k, n = pw.scheme, pw.in_features, pw.out_features
    if s.bits not in (2, 4, 8) or k % 32 or n % 32 or (s.group_size != -1 and k % s.group_size):
        return None
    layer = ArkQuantLinear(s.bits, s.group_size, s.sym, k, n, bias=False, weight_dtype=torch.float32)
    layer.qweight, layer.scales = pw.qweight.clone(), pw.scales.float()
    layer.qzeros = pack(pw.zeros.to(torch.int32), s.bits, dim=1)  # exact zeros (its ZP_BIAS is 0)
    layer.post_init()  # repacks into its own layout
    return layer


def peer_gptqmodel(kind: str):
    """A builder of GPTQModel's CPU QuantLinear `kind` with our tensors (None where GPTQModel is not installed
    or the kernel cannot take the scheme / shape): "torch" (`TorchLinear`: dequantizes the weight on every call,
    that dequantization torch.compile'd, as GPTQModel sets it up), "fused" (`TorchFusedLinear`: 4-bit through
    aten's int4 CPU op), "int8" (`TorchInt8Linear`: 8-bit through aten's int8 op)."""
    module, cls_name, bits = {"torch": ("torch", "TorchLinear", (2, 3, 4, 8)),
                              "fused": ("torch_fused", "TorchFusedLinear", (4,)),
                              "int8": ("torch_int8", "TorchInt8Linear", (8,))}[kind]

    def build(pw: PackedWeight):
        try:
            cls = getattr(importlib.import_module(f"gptqmodel.nn_modules.qlinear.{module}"), cls_name)
        except Exception as e:  # ImportError, or its own import-time checks
            if f"gptqmodel.{kind}" not in _warned:
                _warned.add(f"gptqmodel.{kind}")
                log.warning("GPTQModel %s unavailable: %s", cls_name, e)
            return None
        s, k, n = pw.scheme, pw.in_features, pw.out_features
        if s.bits not in bits or k % 32 or n % 32 or (s.group_size != -1 and k % s.group_size):
            return None
        layer = cls(bits=s.bits, group_size=s.group_size, sym=s.sym, desc_act=False, in_features=k, out_features=n,
                    bias=False)
        layer.qweight, layer.scales = pw.qweight.clone(), pw.scales.clone()
        layer.qzeros = pack(pw.zeros.to(torch.int32), s.bits, dim=1)  # its in-memory zeros are exact (GPTQ v2)
        layer.g_idx = (torch.arange(k) // (s.group_size if s.group_size != -1 else k)).to(torch.int32)
        layer.post_init()
        return layer.eval()

    return build


_warned: set[str] = set()
PEERS = {"autoround_torch": peer_autoround, "autoround_ark": peer_ark, "gptqmodel_torch": peer_gptqmodel("torch"),
         "gptqmodel_fused": peer_gptqmodel("fused"), "gptqmodel_int8": peer_gptqmodel("int8")}
# these dequantize the weight per call or fall to a slow aten path: 2.5x-640x behind wq at M <= 16 (docs/cpu.md,
# "Peers"), so they are timed only up to --peer-max-m
SLOW_PEERS = ("autoround_torch", "gptqmodel_torch", "gptqmodel_int8")
PEER_TOL = 2e-2  # bf16-activation peers (aten int4/int8) err ~0.5%; a wrong result is far above this


def guarded(what: str, fn, *args):
    """fn(*args), or None (logged) when a peer raises: a peer that fails on one shape must not end the run."""
    try:
        return fn(*args)
    except Exception as e:
        log.warning("%s failed: %s: %s", what, type(e).__name__, str(e).strip().splitlines()[0][:200] if str(e) else "")
        return None


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def timeit(fn, target_s: float = 0.02) -> float:
    """Seconds per call (already warm), averaged over enough calls to fill about target_s."""
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    if one >= target_s:
        return one
    n = max(1, min(200, int(target_s / max(one, 1e-6))))
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def interleaved(cands: dict, reps: int) -> dict[str, dict]:
    """cands: name -> fn; 'fp32' and 'bf16' must be among them. Median times and median ratios vs dense."""
    times = {k: [] for k in cands}
    ratios = {k: [] for k in cands}
    for f in cands.values():
        f()  # warm: kernel caches, allocator
    for _ in range(reps):
        t = {k: timeit(f) for k, f in cands.items()}
        dense = min(t["fp32"], t["bf16"])
        for k in cands:
            times[k].append(t[k])
            ratios[k].append(dense / t[k])
    return {k: {"ms": 1e3 * statistics.median(times[k]), "x_dense": statistics.median(ratios[k])} for k in cands}


@torch.no_grad()
def bench_layers(args) -> list[dict]:
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for family in args.families:
            for n, k in SHAPES[family]:
                w32 = torch.randn(n, k) * 0.02
                w16 = w32.bfloat16()
                packed = {s: random_packed(n, k, s) for s in args.schemes}
                layers = {s: QuantLinear.from_packed(pw) for s, pw in packed.items()}
                peers = {(s, name): guarded(f"{name} {s} {n}x{k}", make, pw) for s, pw in packed.items()
                         for name, make in PEERS.items()} if args.peers else {}
                states = {}
                for s, pw in packed.items():
                    for kn in args.kernels:
                        kern = KERNELS.get(kn)
                        if kern.why_not("cpu", torch.float32, pw, 1, any_m=True) is None:  # forced: any M
                            states[(s, kn)] = (kern, kern.prepare(pw))
                for m in args.m:
                    x32 = torch.randn(m, k)
                    x16 = x32.bfloat16()
                    cands = {"fp32": partial(F.linear, x32, w32), "bf16": partial(F.linear, x16, w16)}
                    auto, wrong = {}, []
                    for s in args.schemes:
                        cands[f"{s}/auto"] = partial(layers[s], x32)
                        auto[s] = select(x32, packed[s]).name
                        for (s2, kn), (kern, st) in states.items():
                            if s2 == s and not (kn == "cpu_avx2" and m > args.native_max_m):
                                cands[f"{s}/{kn}"] = partial(kern.fn, x32, packed[s], None, st)
                        for name in PEERS:
                            peer = peers.get((s, name))
                            if peer is None or (name in SLOW_PEERS and m > args.peer_max_m):
                                continue
                            y = guarded(f"{name} {s} {n}x{k} M={m}", peer, x32)
                            err = float("inf") if y is None else rel_err(y, reference_matmul(x32, packed[s], None))
                            if err > PEER_TOL:  # timed only when it computes the layer (see docs/cpu.md, Peers)
                                wrong.append(f"{s}/{name}")
                                log.warning("%s %s on %dx%d M=%d, %d thread(s): relative error %.2f vs the reference "
                                            "(inf: it raised); not timed", name, s, n, k, m, threads, err)
                                continue
                            cands[f"{s}/{name}"] = partial(peer, x32)
                    res = interleaved(cands, args.reps)
                    row = {"threads": threads, "family": family, "shape": f"{n}x{k}", "m": m, "auto": auto,
                           "results": res, "peer_wrong": wrong}
                    rows.append(row)
                    best = {s: res[f"{s}/auto"]["x_dense"] for s in args.schemes}
                    print(f"t={threads} {family} {n}x{k} M={m} fp32 {res['fp32']['ms']:.2f}ms "
                          f"bf16 {res['bf16']['ms']:.2f}ms | " + " ".join(f"{s}:{v:.2f}x" for s, v in best.items()),
                          flush=True)
    return rows


@torch.no_grad()
def bench_cold(args) -> list[dict]:
    """Per-layer time with weights that come from DRAM, as in a real decode (every layer's weights are
    read once per token and a model's weights do not fit the last-level cache): each candidate cycles
    through enough copies of its weights that one cycle exceeds --rotate-mb. Dense fp32/bf16 F.linear vs
    each scheme through QuantLinear (automatic dispatch), interleaved, median of --reps ratios."""
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for n, k in SHAPES["llama1b"]:
            def copies(nbytes: int) -> int:
                return max(2, min(256, -(-args.rotate_mb * 2**20 // nbytes)))

            w32 = [torch.randn(n, k) * 0.02 for _ in range(copies(n * k * 4))]
            w16 = [w.bfloat16() for w in w32[: copies(n * k * 2)]]
            w16 += [torch.randn(n, k).bfloat16() * 0.02 for _ in range(copies(n * k * 2) - len(w16))]
            layers = {}
            for s in args.schemes:
                pw = random_packed(n, k, s)
                nb = pw.qweight.numel() * 4 + pw.scales.numel() * 2
                layers[s] = [QuantLinear.from_packed(PackedWeight(
                    qweight=pw.qweight.clone(), scales=pw.scales.clone(), zeros=pw.zeros.clone(), scheme=pw.scheme,
                    in_features=k, out_features=n)) for _ in range(copies(nb))]
                if args.compact:
                    for ql in layers[s]:
                        ql.compact_()
            for m in args.m:
                x32 = torch.randn(m, k)
                x16 = x32.bfloat16()

                def cycle(fns):
                    it = [0]

                    def call():
                        it[0] = (it[0] + 1) % len(fns)
                        return fns[it[0]]()
                    return call

                cands = {"fp32": cycle([partial(F.linear, x32, w) for w in w32]),
                         "bf16": cycle([partial(F.linear, x16, w) for w in w16])}
                for s, qls in layers.items():
                    cands[s] = cycle([partial(ql, x32) for ql in qls])
                    for ql in qls:
                        ql(x32)  # prepare every copy's layout before timing
                res = interleaved(cands, args.reps)
                auto = {s: select(x32, layers[s][0]._shell() if args.compact else layers[s][0].packed).name
                        for s in layers}
                rows.append({"threads": threads, "family": "llama1b", "shape": f"{n}x{k}", "m": m, "auto": auto,
                             "results": {(f"{s}/auto" if s in layers else s): v for s, v in res.items()},
                             "copies": {"fp32": len(w32), "bf16": len(w16), **{s: len(v) for s, v in layers.items()}}})
                print(f"cold t={threads} {n}x{k} M={m} fp32 {res['fp32']['ms']:.2f}ms bf16 {res['bf16']['ms']:.2f}ms | "
                      + " ".join(f"{s}:{res[s]['x_dense']:.2f}x" for s in layers), flush=True)
    return rows


def module_bytes(model) -> int:
    """Bytes of parameters and buffers (meta tensors of compacted layers excluded) plus every repacked
    kernel layout the layers hold (the per-weight cache of the op, or a compacted layer's own layout)."""
    from wq.kernels import ops

    def size(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor) and not t.is_meta)

    total = size(list(model.parameters()) + list(model.buffers()))
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            compact = mod.__dict__.get("_compact")
            hit = ops._STATE.get(id(mod.qweight))
            states = [compact] if compact is not None else list(hit[2].values()) if hit else []
            total += sum(size(vars(st).values()) for st in states if st is not None)
    return total


def swap_random(model, scheme: str, peer=None) -> bool:
    """Replace every decoder Linear (or QuantLinear) with a QuantLinear holding random codes (timing only), or
    with the module peer(packed) builds from the same codes (seeded per shape: a copy of a swapped model gets
    the codes it already holds); False (model unusable) where the peer cannot take a layer."""
    from wq.nn.surgery import set_module

    for name, mod in list(model.named_modules()):
        if isinstance(mod, (torch.nn.Linear, QuantLinear)) and "lm_head" not in name:
            pw = random_packed(mod.out_features, mod.in_features, scheme)
            layer = QuantLinear.from_packed(pw) if peer is None else peer(pw)
            if layer is None:
                return False
            set_module(model, name, layer)
    return True


@torch.no_grad()
def bench_decode(args) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import wq

    torch.set_num_threads(args.decode_threads)
    out = []
    # real model, RTN-quantized from its fp32 weights
    from wq import assets

    path = assets.resolve_model(None)
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok("Elizabeth Bennet walked to Netherfield because", return_tensors="pt").input_ids
    models = {"fp32": base, "bf16": copy.deepcopy(base).to(torch.bfloat16)}
    for s in args.decode_schemes:
        q = copy.deepcopy(base)
        wq.quantize_model(q, s, progress=False)
        models[s] = q.to(getattr(torch, args.quant_dtype))  # dense parts (embeddings, lm_head, norms)
    out.append(_decode_run("smollm2-135m (real, RTN)", models, ids, args))
    del models, base
    # Llama-1B-shaped random model
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=args.llama_layers,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=args.llama_vocab,
                      tie_word_embeddings=True, max_position_embeddings=4096)
    base = LlamaForCausalLM(cfg).eval()
    models = {"fp32": base, "bf16": copy.deepcopy(base).to(torch.bfloat16)}
    for s in args.decode_schemes:
        q = LlamaForCausalLM(cfg).eval()
        swap_random(q, s)
        q.to(getattr(torch, args.quant_dtype))
        models[s] = q
        if args.peers:  # the same model (dense parts and codes) through auto-round-lib's ark kernels
            q = copy.deepcopy(q)
            if swap_random(q, s, peer=peer_ark):
                models[f"{s}/ark"] = q
    ids = torch.randint(0, args.llama_vocab, (1, ids.shape[1]))
    for key in [k for k in models if k.endswith("/ark")]:  # same codes: its logits must match wq's exact path
        with exact_kernels():
            ref = models[key.removesuffix("/ark")](ids).logits
        err = rel_err(models[key](ids).logits, ref)
        if err > 5e-2:
            log.warning("%s: logits relative error %.2f vs wq's exact kernels on the same codes; not timed", key, err)
            del models[key]
    name = f"llama1b-shaped (random, {args.llama_layers} layers, vocab {args.llama_vocab})"
    out.append(_decode_run(name, models, ids, args))
    return out


def _decode_run(name: str, models: dict, ids, args) -> dict:
    def gen(model):
        return model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)

    for m in models.values():
        gen(m)  # warm up; also builds the kernel caches
    tps = {k: [] for k in models}
    ratio = {k: [] for k in models}
    for _ in range(args.decode_reps):
        t = {}
        for k, m in models.items():
            t0 = time.perf_counter()
            gen(m)
            t[k] = args.tokens / (time.perf_counter() - t0)
        dense = max(t["fp32"], t["bf16"])
        for k in models:
            tps[k].append(t[k])
            ratio[k].append(t[k] / dense)
    res = {k: {"tok_s": statistics.median(tps[k]), "x_dense": statistics.median(ratio[k]),
               "weight_mb": module_bytes(models[k]) / 2**20} for k in models}
    print(name)
    for k, v in res.items():
        print(f"  {k:8s} {v['tok_s']:7.2f} tok/s  {v['x_dense']:.2f}x dense  weights {v['weight_mb']:.0f} MiB", flush=True)
    return {"model": name, "tokens": args.tokens, "results": res}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


@torch.no_grad()
def rss_one(args) -> dict:
    """One model in a fresh process: resident memory after building it, and the peak while it decodes.

    The peak counter (VmHWM) is reset after the model is built (Linux /proc/self/clear_refs "5"), so the
    peak is the decode's, not the construction's (building a random model goes through dense weights).
    """
    import gc

    from transformers import LlamaConfig, LlamaForCausalLM

    from wq.nn import compact

    torch.set_num_threads(args.decode_threads)
    base_kib = _rss_kib("VmRSS")  # python + torch + transformers, no model
    variant = args.rss_variant
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=args.llama_layers,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=args.llama_vocab,
                      tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    dtype = torch.float32 if variant == "fp32" else torch.bfloat16  # quantized: dense parts bf16, as saved
    torch.set_default_dtype(dtype)
    model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    if variant not in ("fp32", "bf16"):
        swap_random(model, variant)
        if args.compact:
            compact(model)
    gc.collect()
    try:  # hand the dense construction's freed heap back to the OS (a real load never builds it)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    built_kib = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    ids = torch.randint(0, args.llama_vocab, (1, 10))
    gen = partial(model.generate, ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                  eos_token_id=None, pad_token_id=0)
    gen()
    t0 = time.perf_counter()
    gen()
    tok_s = args.tokens / (time.perf_counter() - t0)
    return {"variant": variant, "compact": bool(args.compact), "baseline_rss_mib": base_kib / 1024,
            "built_rss_mib": built_kib / 1024, "peak_rss_mib": _rss_kib("VmHWM") / 1024, "tok_s": tok_s,
            "weights_mib": module_bytes(model) / 2**20, "layers": args.llama_layers, "vocab": args.llama_vocab,
            "threads": torch.get_num_threads()}


def bench_rss(args) -> list[dict]:
    """rss_one for each variant, each in its own process (peak RSS is per process)."""
    import subprocess

    rows = []
    for variant in ["fp32", "bf16", *args.decode_schemes]:
        cmd = [sys.executable, __file__, "--part", "rss-one", "--rss-variant", variant, "--tokens", str(args.tokens),
               "--llama-layers", str(args.llama_layers), "--llama-vocab", str(args.llama_vocab),
               "--decode-threads", str(args.decode_threads), "--compact" if args.compact else "--no-compact"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    bf16 = next(r for r in rows if r["variant"] == "bf16")
    for r in rows:
        r["peak_vs_bf16"] = r["peak_rss_mib"] / bf16["peak_rss_mib"]
        r["model_vs_bf16"] = (r["peak_rss_mib"] - r["baseline_rss_mib"]) / (bf16["peak_rss_mib"] - bf16["baseline_rss_mib"])
    return rows


def to_markdown(result: dict) -> str:
    """Tables of the ratios (x the faster dense, median over interleaved repetitions)."""
    out = []
    rows = result.get("layers") or []
    if rows:
        schemes = list(rows[0]["auto"])
        out.append("| threads | layer (out x in) | M | fp32 ms | bf16 ms | " + " | ".join(
            f"{s} (kernel)" for s in schemes) + " |")
        out.append("|" + "---|" * (5 + len(schemes)))
        for r in rows:
            res = r["results"]
            cells = [f"{res[s + '/auto']['x_dense']:.2f}x ({r['auto'][s]})" for s in schemes]
            out.append(f"| {r['threads']} | {r['shape']} | {r['m']} | {res['fp32']['ms']:.2f} | {res['bf16']['ms']:.2f} | "
                       + " | ".join(cells) + " |")
        kern = sorted({k.split("/", 1)[1] for r in rows for k in r["results"] if "/" in k and not k.endswith("/auto")})
        if kern:  # the cold part times the automatic choice only
            out.append("\nEach kernel forced, x the faster dense (`-`: cannot run or not timed at that M):\n")
            out.append("| threads | layer | M | scheme | " + " | ".join(kern) + " |")
            out.append("|" + "---|" * (4 + len(kern)))
        for r in rows if kern else []:
            for s in schemes:
                cells = [f"{r['results'][f'{s}/{k}']['x_dense']:.2f}x" if f"{s}/{k}" in r["results"] else "-"
                         for k in kern]
                out.append(f"| {r['threads']} | {r['shape']} | {r['m']} | {s} | " + " | ".join(cells) + " |")
    rss = result.get("rss") or []
    if rss:
        r0 = rss[0]
        out.append(f"\nLlama-3.2-1B-shaped (random, {r0['layers']} layers, vocab {r0['vocab']}), one process per model, "
                   f"{r0['threads']} thread(s), compact={r0['compact']}:\n")
        out.append("| model | peak RSS MiB (decode) | x bf16 | peak minus process baseline, x bf16 | RSS after build MiB "
                   "| weights MiB | tokens/s (this process alone) |")
        out.append("|---|---|---|---|---|---|---|")
        for r in rss:
            out.append(f"| {r['variant']} | {r['peak_rss_mib']:.0f} | {r['peak_vs_bf16']:.2f} | {r['model_vs_bf16']:.2f} "
                       f"| {r['built_rss_mib']:.0f} | {r['weights_mib']:.0f} | {r['tok_s']:.2f} |")
    for d in result.get("decode") or []:
        out.append(f"\n{d['model']}, greedy decode of {d['tokens']} tokens:\n")
        out.append("| model | tokens/s | x the faster dense | weights + kernel layouts MiB |")
        out.append("|---|---|---|---|")
        for k, v in d["results"].items():
            out.append(f"| {k} | {v['tok_s']:.2f} | {v['x_dense']:.2f}x | {v['weight_mb']:.0f} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["layers", "cold", "decode", "rss", "rss-one", "all"], default="all")
    p.add_argument("--rotate-mb", type=int, default=256, help="(cold) bytes one cycle of weight copies spans")
    p.add_argument("--rss-variant", default="W4G128", help="(rss-one) fp32, bf16 or a scheme")
    p.add_argument("--compact", action=argparse.BooleanOptionalAction, default=True,
                   help="quantized models keep only the CPU kernel layout (QuantLinear.compact_)")
    p.add_argument("--threads", type=int, nargs="+", default=[2])
    p.add_argument("--families", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 256])
    p.add_argument("--schemes", nargs="+", default=SCHEMES)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--kernels", nargs="+", default=CPU_KERNELS, choices=CPU_KERNELS,
                   help="(layers) kernels to force beside the automatic choice")
    p.add_argument("--native-max-m", type=int, default=64, help="skip cpu_avx2 (fp32) timings beyond this M")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--peer-max-m", type=int, default=16)
    p.add_argument("--decode-schemes", nargs="+", default=["W4G128", "W3G128", "W2G128", "W8"])
    p.add_argument("--decode-threads", type=int, default=2)
    p.add_argument("--quant-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="(decode) dtype of the quantized models' dense parts, as wq.load gives by default (bf16)")
    p.add_argument("--decode-reps", type=int, default=3)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--llama-layers", type=int, default=4)
    p.add_argument("--llama-vocab", type=int, default=32000)
    p.add_argument("--out", type=Path, default=None, help="write <out>_<part>.json")
    p.add_argument("--summarize", type=Path, nargs="+", default=None, help="print the tables of saved JSONs")
    args = p.parse_args(argv)
    if args.summarize:
        for path in args.summarize:
            print(to_markdown(json.loads(path.read_text())) + "\n")
        return
    logging.basicConfig(level=logging.WARNING)
    force_kernel(None)
    if args.part == "rss-one":
        print(json.dumps(rss_one(args)))
        return
    result = {"argv": sys.argv, "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if args.part in ("layers", "all"):
        result["layers"] = bench_layers(args)
    if args.part == "cold":
        result["layers"] = bench_cold(args)
    if args.part in ("decode", "all"):
        result["decode"] = bench_decode(args)
    if args.part in ("rss", "all"):
        result["rss"] = bench_rss(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        path = Path(f"{args.out}_{args.part}.json")
        path.write_text(json.dumps(result, indent=1))
        print("wrote", path)
    print(to_markdown(result))


if __name__ == "__main__":
    main()
