"""Ahead-of-time compile check: every row of triton_configs.CONFIGS, compiled by Triton's own compiler
for real GPU targets on a machine without a GPU, and held to the target's limits.

    python -m wq.kernels.triton_aot                      # all targets, prints a table, exit 1 on a failure
    python -m wq.kernels.triton_aot --targets sm90 --json out.json
    python -m wq.kernels.triton_aot --device             # the GPU in this machine, against its own limits

For each (family row, target of that family, variant) it builds the exact `Launch` the launcher
would build (the launchers' own `plan_*` functions, at a Llama-sized 4096 x 4096 layer) and compiles
it with `triton.compile(ASTSource(...), target=GPUTarget(...))`. Variants: `hot` (symmetric,
group 128, bf16: the common checkpoint) and `full` (asymmetric zeros, group 32, act-order, bias,
fp16: every optional load at once). It fails when a kernel does not compile, needs more shared
memory per block than the target allows, or spills registers (local-memory loads/stores in the
SASS, scratch on AMD) in a row marked hot. Registers, shared memory and the blocks per SM they allow
are reported (predicted occupancy, not a measurement).

Results are cached as JSON under ~/.cache/wq/triton-aot (WQ_CACHE), keyed by the Triton version,
the kernel's source hash (Triton's own `cache_key`, which covers the jit functions it calls) and
the whole launch (constexprs, argument types, warps, stages, target), so a warm run compiles
nothing. Must run in a process where TRITON_INTERPRET is unset (the interpreter has no compiler);
the tests call it in a subprocess.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .triton_configs import CONFIGS, TARGETS, Target, TileConfig
from .triton_launch import Launch, WeightMeta

N_REF = K_REF = 4096  # a Llama-sized layer for the launch plans (shapes change no resource use)
_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
       torch.uint8: "u8"}


@dataclass(frozen=True)
class Variant:
    name: str
    sym: bool
    group: int
    act_order: bool
    bias: bool
    dtype: torch.dtype


VARIANTS = {
    "hot": Variant("hot", sym=True, group=128, act_order=False, bias=False, dtype=torch.bfloat16),
    "full": Variant("full", sym=False, group=32, act_order=True, bias=True, dtype=torch.float16),
}
# what each path is compiled as: (variant, M). The gemv at one row (decode) and at its largest row
# count (8: most accumulators per thread), each with both variants (the group size changes its K
# step); the GEMMs at the largest M of their range; the dequant kernel does not depend on M.
CHECKS: dict[str, tuple[tuple[str, int], ...]] = {
    "gemv": (("hot", 1), ("full", 1), ("hot", 8), ("full", 8)),
    "gemm_s": (("hot", 64), ("full", 64)),
    "gemm_l": (("hot", 1024), ("full", 1024)),
    "dequant": (("full", 1),),
}


def meta_for(bits: int, v: Variant) -> WeightMeta:
    return WeightMeta(bits=bits, group=v.group, in_features=K_REF, out_features=N_REF,
                      const_zero=2 ** (bits - 1) if v.sym else -1, act_order=v.act_order)


def plan(path: str, bits: int, cfg: TileConfig, v: Variant, m: int, sms: int) -> Launch:
    """The launch the launcher builds for this row at M = m (with split-K for gemv)."""
    from . import triton_dequant, triton_matmul

    meta = meta_for(bits, v)
    if path == "gemv":
        launch, splits = triton_matmul.plan_gemv(meta, m, v.dtype, cfg, sms, v.bias)
        assert splits > 1, "the reference layer must exercise split-K"
        return launch
    if path in ("gemm_s", "gemm_l"):
        return triton_matmul.plan_gemm(meta, m, v.dtype, cfg, v.bias)
    if path == "dequant":
        return triton_dequant.plan_dequant(meta, v.dtype, cfg)
    raise ValueError(f"unknown path {path!r}")


def source(launch: Launch):
    """(signature, constexprs, attrs) for ASTSource, specialized the way the JIT specializes a launch
    with 16-byte aligned tensors: ints equal to 1 become constants, multiples of 16 get the hint."""
    fn = launch.kernel
    sig: dict[str, str] = {}
    consts = dict(launch.constexprs)
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(fn.arg_names):
        if name in launch.ptrs:
            dt = launch.ptrs[name]
            if dt is None:
                sig[name], consts[name] = "constexpr", None
            else:
                sig[name] = "*" + _TY[dt]
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in launch.ints:
            v = launch.ints[name]
            if v == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in consts:
            sig[name] = "constexpr"
        else:
            raise TypeError(f"{fn.__name__}: argument {name!r} missing from the launch")
    return sig, consts, attrs


def _ast_source(ast_source, launch: Launch):
    """ASTSource for this Triton: `constexprs=` and attribute lists from 3.3 on; before that
    `constants=` (constexprs and None pointers alike) and an AttrsDescriptor of divisibility hints."""
    sig, consts, attrs = source(launch)
    if "constexprs" in inspect.signature(ast_source.__init__).parameters:
        return ast_source(launch.kernel, sig, constexprs=consts, attrs=attrs)
    from triton.backends.compiler import AttrsDescriptor

    hints = {i: 16 for (i,) in attrs}
    return ast_source(launch.kernel, {k: v for k, v in sig.items() if v != "constexpr"}, constants=consts,
                      attrs=AttrsDescriptor.from_hints(hints))


def cache_root() -> Path:
    root = os.environ.get("WQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "wq")
    return Path(root) / "triton-aot"


def cache_key(launch: Launch, target: Target) -> str:
    import triton

    sig, consts, attrs = source(launch)
    desc = json.dumps({
        "triton": triton.__version__, "kernel": launch.kernel.__name__, "src": launch.kernel.cache_key,
        "sig": sig, "consts": {k: str(v) for k, v in consts.items()}, "attrs": {str(k): v for k, v in attrs.items()},
        "warps": launch.num_warps, "stages": launch.num_stages, "target": [target.backend, target.arch],
    }, sort_keys=True)
    return hashlib.sha256(desc.encode()).hexdigest()[:32]


def _nvidia_tool(name: str) -> str:
    import triton.backends.nvidia as nv

    path = Path(nv.__file__).parent / "bin" / name
    return str(path) if path.exists() else name


def _cuda_resources(kernel) -> dict:
    """Registers, stack and local-memory traffic of a compiled CUDA kernel, read from its cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"cannot read cuobjdump -res-usage output:\n{usage}")
    instrs = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    return {"registers": int(m[1]), "stack": int(m[2]), "local": int(m[4]),
            "spill_stores": sum(op.startswith("STL") for op in instrs),
            "spill_loads": sum(op.startswith("LDL") for op in instrs), "instructions": len(instrs)}


def _hip_resources(kernel) -> dict:
    asm = kernel.asm["amdgcn"]

    def num(pattern: str) -> int:
        m = re.search(pattern, asm)
        return int(m[1]) if m else 0

    spills = num(r"\.vgpr_spill_count:\s+(\d+)") + num(r"\.sgpr_spill_count:\s+(\d+)")
    return {"registers": num(r"; NumVgprs:\s+(\d+)"), "stack": num(r"; ScratchSize:\s+(\d+)"), "local": 0,
            "spill_stores": spills, "spill_loads": 0, "instructions": asm.count("\n\t"),
            "occupancy_waves_per_simd": num(r"; Occupancy:\s+(\d+)")}


def blocks_per_sm(target: Target, registers: int, shared: int, warps: int) -> int:
    """Resident blocks per SM that registers, shared memory and the hardware caps allow (predicted)."""
    if target.backend == "hip":
        waves_per_simd = min(8, 512 // max(registers, 1))  # VGPRs per lane per SIMD: 512 (gfx90a/gfx942)
        by_regs = 4 * waves_per_simd // warps
    else:
        per_warp = -(-registers * 32 // 256) * 256  # allocated in units of 256 registers per warp
        by_regs = (target.regs_per_sm // per_warp) // warps
    by_smem = target.smem_per_sm // (shared + 1024) if shared else target.max_blocks_per_sm
    return max(0, min(target.max_blocks_per_sm, target.max_warps_per_sm // warps, by_regs, by_smem))


def compile_launch(launch: Launch, target: Target, use_cache: bool = True) -> dict:
    """Compile for `target` (or read the cached result): resources as a dict, or {"error": ...}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    path = cache_root() / f"{cache_key(launch, target)}.json"
    if use_cache and path.exists():
        return {**json.loads(path.read_text()), "cached": True}
    t0 = time.perf_counter()
    try:
        kernel = triton.compile(_ast_source(ASTSource, launch),
                                target=GPUTarget(target.backend, target.arch, target.warp_size),
                                options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
        res = {"shared": int(kernel.metadata.shared)}
        res.update(_cuda_resources(kernel) if target.backend == "cuda" else _hip_resources(kernel))
        res["blocks_per_sm"] = blocks_per_sm(target, res["registers"], res["shared"], launch.num_warps)
    except Exception as e:  # a compile error is a result the check reports, not a crash
        res = {"error": f"{type(e).__name__}: {str(e).strip()[:2000]}"}
    res["compile_s"] = round(time.perf_counter() - t0, 2)
    res["triton"] = triton.__version__
    if use_cache and "error" not in res:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(res))
        tmp.replace(path)
    return {**res, "cached": False}


def problems(res: dict, target: Target, hot: bool) -> list[str]:
    """What makes this compiled configuration fail the check (empty: it passes)."""
    if "error" in res:
        return [f"does not compile: {res['error'].splitlines()[0] if res['error'] else '?'}"]
    out = []
    if res["shared"] > target.smem_per_block:
        out.append(f"shared memory {res['shared']} B > {target.smem_per_block} B per block")
    if hot and (res["spill_stores"] or res["spill_loads"]):
        out.append(f"spills registers ({res['spill_stores']} local stores, {res['spill_loads']} local loads)")
    if res["blocks_per_sm"] < 1:
        out.append("no block fits on one SM")
    return out


@dataclass
class Row:
    target: str
    family: str
    path: str
    bits: int
    variant: str
    kernel: str
    block: str  # "MxNxK w<warps> s<stages>"
    hot: bool
    result: dict
    problems: list[str]


def rows(targets: list[str] | None = None, configs: dict | None = None) -> list[tuple[Target, str, int, TileConfig]]:
    """Every (target, path, bits, config) the check compiles: each target x each row of its family."""
    configs = CONFIGS if configs is None else configs
    out = []
    for name in targets or list(TARGETS):
        t = TARGETS[name]
        for (family, path, bits), cfg in sorted(configs.items()):
            if family == t.family:
                out.append((t, path, bits, cfg))
    return out


def jobs(targets: list[str] | None = None, configs: dict | None = None
         ) -> list[tuple[Target, str, int, TileConfig, str, int]]:
    """(target, path, bits, config, variant, M) for every compilation the check makes."""
    return [(t, path, bits, cfg, v, m) for t, path, bits, cfg in rows(targets, configs) for v, m in CHECKS[path]]


def check(targets: list[str] | None = None, use_cache: bool = True, workers: int = 1,
          progress: bool = False, configs: dict | None = None) -> list[Row]:
    """Compile (or read from the cache) every job; `configs` replaces CONFIGS (tests)."""
    todo = jobs(targets, configs)
    launches = [plan(path, bits, cfg, VARIANTS[v], m, t.sms) for t, path, bits, cfg, v, m in todo]
    cached = [_cached(launch, t) if use_cache else None for (t, *_), launch in zip(todo, launches)]
    missing = [i for i, c in enumerate(cached) if c is None]
    results: list[dict | None] = list(cached)
    if workers > 1 and len(missing) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(missing))) as pool:
            args = [(todo[i][0], *todo[i][1:], use_cache) for i in missing]
            for n, (i, res) in enumerate(zip(missing, pool.map(_compile_job, args))):
                results[i] = res
                if progress:
                    print(f"\rcompiled {n + 1}/{len(missing)}", end="", file=sys.stderr, flush=True)
    else:
        for n, i in enumerate(missing):
            results[i] = compile_launch(launches[i], todo[i][0], use_cache)
            if progress:
                print(f"\rcompiled {n + 1}/{len(missing)}", end="", file=sys.stderr, flush=True)
    if progress and missing:
        print(file=sys.stderr)
    out = []
    for (t, path, bits, cfg, v, m), launch, res in zip(todo, launches, results):
        c = launch.constexprs
        out.append(Row(t.name, t.family, path, bits, f"{v} M={m}", launch.kernel.__name__,
                       f"{c.get('BLOCK_M', 1)}x{c['BLOCK_N']}x{c['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}",
                       cfg.hot, res, problems(res, t, cfg.hot)))
    return out


def _cached(launch: Launch, target: Target) -> dict | None:
    path = cache_root() / f"{cache_key(launch, target)}.json"
    return {**json.loads(path.read_text()), "cached": True} if path.exists() else None


def _compile_job(job) -> dict:
    t, path, bits, cfg, v, m, use_cache = job
    return compile_launch(plan(path, bits, cfg, VARIANTS[v], m, t.sms), t, use_cache)


def markdown(results: list[Row]) -> str:
    head = "| target | path | bits | variant | tile (MxNxK, warps, stages) | regs | shared B | limit B | " \
           "spill ops | blocks/SM | status |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        res = r.result
        limit = TARGETS[r.target].smem_per_block
        if "error" in res:
            lines.append(f"| {r.target} | {r.path} | {r.bits} | {r.variant} | {r.block} | - | - | {limit} | - | - | "
                         f"FAIL: {r.problems[0]} |")
            continue
        status = "ok" if not r.problems else "FAIL: " + "; ".join(r.problems)
        lines.append(f"| {r.target} | {r.path} | {r.bits} | {r.variant} | {r.block} | {res['registers']} | "
                     f"{res['shared']} | {limit} | {res['spill_stores'] + res['spill_loads']} | "
                     f"{res['blocks_per_sm']} | {status} |")
    return "\n".join(lines) + "\n"


def device_target() -> Target:
    """A Target for the GPU in this machine, with the limits the driver reports."""
    from .triton_configs import family_for

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    hip = getattr(torch.version, "hip", None) is not None
    smem_block = getattr(props, "shared_memory_per_block_optin", 0) or 49152
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", 0) or smem_block
    if hip:
        arch = props.gcnArchName.split(":")[0]
        return Target("device", "hip", arch, 64, family_for(None, hip=True), smem_block, smem_sm, 32, 32,
                      props.multi_processor_count, props.name, regs_per_sm=512 * 64 * 4)
    return Target("device", "cuda", props.major * 10 + props.minor, 32, family_for((props.major, props.minor)),
                  smem_block, smem_sm, props.max_threads_per_multi_processor // 32, 32,
                  props.multi_processor_count, props.name, regs_per_sm=getattr(props, "regs_per_multiprocessor", 65536))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    p.add_argument("--device", action="store_true", help="check against this machine's GPU instead")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--workers", type=int, default=0, help="compile processes (0: one per core, at most 4)")
    p.add_argument("--json", default=None, help="write every result here")
    p.add_argument("--md", default=None, help="write the markdown table here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter has no compiler", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if args.device:
        TARGETS["device"] = device_target()
        targets = ["device"]
    else:
        targets = args.targets.split(",")
    workers = args.workers or min(4, os.cpu_count() or 1)
    results = check(targets, use_cache=not args.no_cache, workers=workers, progress=sys.stderr.isatty())
    elapsed = time.perf_counter() - t0
    md = markdown(results)
    print(md)
    bad = [r for r in results if r.problems]
    compiled = sum(not r.result.get("cached") for r in results)
    print(f"{len(results)} configurations, {compiled} compiled, {len(results) - compiled} cached, "
          f"{len(bad)} failing, {elapsed:.1f} s")
    if args.json:
        import triton

        Path(args.json).write_text(json.dumps({
            "triton": triton.__version__, "targets": {n: asdict(TARGETS[n]) for n in targets},
            "seconds": round(elapsed, 1), "rows": [asdict(r) for r in results]}, indent=1, default=str))
    if args.md:
        Path(args.md).write_text(md)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
