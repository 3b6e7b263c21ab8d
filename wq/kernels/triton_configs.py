"""Every tile configuration the Triton launchers can use, per GPU family, as data.

Pure Python (no triton import). `triton_matmul` / `triton_dequant` take their block sizes, warps and
stages only from `CONFIGS`, and the AOT compile test (tests/test_triton_aot.py) compiles every row of
it for every target in `TARGETS` and fails on a compile error, on shared memory above the target's
per-block limit, or on register spills in a row marked `hot`. A new path, bit width or family gets
checked by adding its row here; there is no other place a launch configuration can come from.

Paths (M = rows of x, the dispatcher's ranges in triton_backend.py):
    gemv      M 1..8       FMA GEMV, no tensor cores, split-K reduced in-kernel (triton_matmul.gemv)
    gemm_s    M 9..64      tensor-core GEMM, small row tile                    (triton_matmul.gemm)
    gemm_l    M 65..1024   tensor-core GEMM, large tiles                       (triton_matmul.gemm)
    dequant   M > 1024     dequantize to [K, N] for cuBLAS                     (triton_dequant)

Families: the launch picks the row of the device's family (`family_for`). sm_86 and sm_89 share the
99 KiB shared-memory budget and the sm86 rows; sm_90 (and newer datacenter parts) may use the
227 KiB of Hopper; unknown parts get the most conservative CUDA rows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """A compile target and the per-block / per-SM limits the AOT check holds kernels to."""

    name: str  # "sm90"
    backend: str  # "cuda" or "hip"
    arch: int | str  # compute capability as an int (90) or the gfx name
    warp_size: int
    family: str  # which CONFIGS rows it launches
    smem_per_block: int  # bytes, the opt-in maximum a kernel may request
    smem_per_sm: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    sms: int  # multiprocessors of the reference part (for predicted occupancy and split-K)
    parts: str  # what it stands for
    regs_per_sm: int = 65536  # 32-bit registers (per CU and SIMD lane count differ on AMD; see triton_aot)


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("sm80", "cuda", 80, 32, "sm80", 166912, 167936, 64, 32, 108, "A100, A30"),
    Target("sm86", "cuda", 86, 32, "sm86", 101376, 102400, 48, 16, 72, "A10, A40, RTX 3090"),
    Target("sm89", "cuda", 89, 32, "sm86", 101376, 102400, 48, 24, 58, "L4, L40S, RTX 4090"),
    Target("sm90", "cuda", 90, 32, "sm90", 232448, 233472, 64, 32, 132, "H100, H200, GH200"),
    Target("gfx942", "hip", "gfx942", 64, "gfx942", 65536, 65536, 32, 32, 304, "MI300X, MI300A (LDS per workgroup)",
           regs_per_sm=512 * 64 * 4),
)}


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration. For gemv, block_m is the largest row count it serves (rows are
    padded to a power of two up to it); resources only grow with it, so the AOT check compiles it."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    hot: bool = True  # on a hot path: register spills fail the AOT check


PATHS = ("gemv", "gemm_s", "gemm_l", "dequant")
PATH_MAX_M = {"gemv": 8, "gemm_s": 64, "gemm_l": 1024, "dequant": None}
BITS = (2, 3, 4, 8)
FAMILIES = ("sm80", "sm86", "sm90", "gfx942")


def _gemv(bits: int, warps: int) -> TileConfig:
    # each thread owns 4 adjacent output columns (one 128-bit load per packed row) and every packed
    # row of the K tile, so the K reduction stays in registers; 8 packed rows per K step (4 at 3 bits:
    # a 3-bit unit is 3 words)
    block_k = {2: 64, 3: 64, 4: 64, 8: 32}[bits]
    return TileConfig(8, 4 * 32 * warps, block_k, warps, 1)


def _rows() -> dict[tuple[str, str, int], TileConfig]:
    rows: dict[tuple[str, str, int], TileConfig] = {}
    for fam in FAMILIES:
        for bits in BITS:
            warps = 2
            rows[fam, "gemv", bits] = _gemv(bits, warps)
            # GEMM: the packed tile is BLOCK_K*BLOCK_N*bits/8 bytes per stage, x BLOCK_M*BLOCK_K*2
            if fam == "sm90":
                rows[fam, "gemm_s", bits] = TileConfig(32, 128, 128, 4, 4)
                rows[fam, "gemm_l", bits] = TileConfig(128, 128, 64, 8, 4)
            elif fam == "sm80":
                rows[fam, "gemm_s", bits] = TileConfig(32, 128, 64, 4, 4)
                rows[fam, "gemm_l", bits] = TileConfig(128, 128, 64, 8, 3)
            elif fam == "sm86":
                rows[fam, "gemm_s", bits] = TileConfig(32, 128, 64, 4, 3)
                rows[fam, "gemm_l", bits] = TileConfig(128, 128, 32, 8, 3)
            else:  # gfx942: 64 KiB LDS, 64-wide wavefronts
                rows[fam, "gemm_s", bits] = TileConfig(32, 128, 64, 4, 2)
                rows[fam, "gemm_l", bits] = TileConfig(128, 128, 32, 8, 2)
            rows[fam, "dequant", bits] = TileConfig(1, 128, 64 if bits != 3 else 32, 4, 1, hot=False)
    return rows


CONFIGS: dict[tuple[str, str, int], TileConfig] = _rows()


def family_for(capability: tuple[int, int] | None, hip: bool = False) -> str:
    """The CONFIGS family for a device: (major, minor) compute capability, or AMD."""
    if hip:
        return "gfx942"
    if capability is None:
        return "sm86"
    major, minor = capability
    if major in (9, 10):  # Hopper, datacenter Blackwell: >= 227 KiB per block
        return "sm90"
    if (major, minor) == (8, 0):
        return "sm80"
    return "sm86"  # sm_86/87/89, consumer Blackwell (sm_120: 99 KiB) and anything unknown


def config(family: str, path: str, bits: int) -> TileConfig:
    try:
        return CONFIGS[family, path, bits]
    except KeyError:
        raise KeyError(f"no Triton config for family {family!r}, path {path!r}, {bits}-bit; "
                       f"add a row to wq/kernels/triton_configs.py (the AOT test then checks it)") from None


def path_for_m(m: int) -> str:
    for path in PATHS:
        top = PATH_MAX_M[path]
        if top is None or m <= top:
            return path
    raise AssertionError("unreachable")
