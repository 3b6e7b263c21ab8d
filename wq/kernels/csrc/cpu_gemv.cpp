// AVX2 GEMV / small GEMM for packed low-bit weights: y[M, N] = x[M, K] @ dequant(W)[N, K]^T.
//
// Weights are stored per output row in blocks of 32 input channels, in layouts that AVX2 unpacks
// with a few shifts and masks (the Python side, wq/kernels/cpu_native.py, writes them):
//   8-bit: 32 bytes, byte j = code j
//   4-bit: 16 bytes, byte j = code j | code (j + 16) << 4
//   2-bit:  8 bytes, byte j = code j | code (j + 8) << 2 | code (j + 16) << 4 | code (j + 24) << 6
//   3-bit: the 2-bit layout of the low two bits (8 bytes), then a 32-bit plane of bit 2 (little endian;
//          code j's bit at bit 8 * (j % 4) + j / 4)
// Dequantization w = (q - z) * s is folded: y = sum_g s_g * (q_g . x_g) - (z_g * s_g) * sum(x_g),
// with fp32 accumulation. Rows are split over torch's intra-op threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

inline __m256 u8x8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

// One block of 32 codes as 32 unsigned bytes (lane 0: codes 0-15, lane 1: codes 16-31).
template <int BITS>
inline __m256i codes32(const uint8_t* p) {
  if constexpr (BITS == 8) {
    return _mm256_loadu_si256((const __m256i*)p);
  } else if constexpr (BITS == 4) {
    const __m128i v = _mm_loadu_si128((const __m128i*)p);  // byte j: code j | code j+16 << 4
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
  } else {
    // byte j (j < 8): code j | code j+8 << 2 | code j+16 << 4 | code j+24 << 6: qword t shifted by 2t
    int64_t q64;
    std::memcpy(&q64, p, 8);
    const __m256i v = _mm256_set1_epi64x(q64);
    __m256i c = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 2, 4, 6)), _mm256_set1_epi8(0x03));
    if constexpr (BITS == 3) {
      // plane bit 8 * (j % 4) + j / 4 is bit 2 of code j: shifting dword d of the broadcast plane right by d
      // brings code 4d + i's bit to bit 0 of byte i (4 vector instructions; a per-byte bit test took 5)
      int32_t plane;
      std::memcpy(&plane, p + 8, 4);
      const __m256i hb = _mm256_and_si256(
          _mm256_srlv_epi32(_mm256_set1_epi32(plane), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), _mm256_set1_epi8(1));
      c = _mm256_or_si256(c, _mm256_slli_epi16(hb, 2));
    }
    return c;
  }
}

// Decode one block of 32 codes into 4 vectors of 8 floats (codes 0-7, 8-15, 16-23, 24-31).
template <int BITS>
inline void decode32(const uint8_t* p, __m256 out[4]) {
  if constexpr (BITS == 8) {
    for (int t = 0; t < 4; ++t) out[t] = u8x8_to_ps(_mm_loadl_epi64((const __m128i*)(p + 8 * t)));
  } else if constexpr (BITS == 4) {
    const __m128i m4 = _mm_set1_epi8(0x0F);
    __m128i v = _mm_loadu_si128((const __m128i*)p);
    __m128i lo = _mm_and_si128(v, m4);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
    out[0] = u8x8_to_ps(lo);
    out[1] = u8x8_to_ps(_mm_srli_si128(lo, 8));
    out[2] = u8x8_to_ps(hi);
    out[3] = u8x8_to_ps(_mm_srli_si128(hi, 8));
  } else {  // 2/3-bit: the byte expansion of the int8 path, then bytes to floats
    const __m256i c = codes32<BITS>(p);
    const __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
    out[0] = u8x8_to_ps(lo);
    out[1] = u8x8_to_ps(_mm_srli_si128(lo, 8));
    out[2] = u8x8_to_ps(hi);
    out[3] = u8x8_to_ps(_mm_srli_si128(hi, 8));
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

constexpr int block_bytes(int bits) { return bits == 8 ? 32 : bits == 4 ? 16 : bits == 3 ? 12 : 8; }

// MT rows of x at once (weights decoded once per MT rows).
template <int BITS, int MT>
void rows(const float* x, int64_t ldx, const float* xsum, int64_t ng, const uint8_t* w, int64_t row_bytes,
          const float* scales, const float* zs, int64_t kp, int64_t group, float* y, int64_t ldy, int64_t n0,
          int64_t n1) {
  constexpr int BB = block_bytes(BITS);
  constexpr int NA = MT >= 4 ? 1 : 4 / MT;
  const int64_t blocks_per_group = group / 32;
  const int64_t n_blocks = kp / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * row_bytes;
    const float* sr = scales + n * ng;
    const float* zr = zs + n * ng;
    __m256 acc[MT];
    float zterm[MT];
    for (int m = 0; m < MT; ++m) { acc[m] = _mm256_setzero_ps(); zterm[m] = 0.f; }
    for (int64_t g = 0; g < ng; ++g) {
      // NA independent accumulators per x row so the FMA chains do not wait on each other's latency
      __m256 gacc[MT][NA];
      for (int m = 0; m < MT; ++m)
        for (int a = 0; a < NA; ++a) gacc[m][a] = _mm256_setzero_ps();
      const int64_t b0 = g * blocks_per_group;
      const int64_t b1 = std::min(b0 + blocks_per_group, n_blocks);
      for (int64_t b = b0; b < b1; ++b) {
        __m256 wv[4];
        decode32<BITS>(wr + b * BB, wv);
        for (int m = 0; m < MT; ++m) {
          const float* xp = x + m * ldx + b * 32;
          for (int t = 0; t < 4; ++t)
            gacc[m][t % NA] = _mm256_fmadd_ps(wv[t], _mm256_loadu_ps(xp + 8 * t), gacc[m][t % NA]);
        }
      }
      const __m256 s = _mm256_set1_ps(sr[g]);
      for (int m = 0; m < MT; ++m) {
        __m256 gsum = gacc[m][0];
        for (int a = 1; a < NA; ++a) gsum = _mm256_add_ps(gsum, gacc[m][a]);
        acc[m] = _mm256_fmadd_ps(gsum, s, acc[m]);
        zterm[m] += zr[g] * xsum[m * ng + g];
      }
    }
    for (int m = 0; m < MT; ++m) y[m * ldy + n] = hsum(acc[m]) - zterm[m];
  }
}

template <int BITS>
void run(const float* x, int64_t M, int64_t kp, const float* xsum, int64_t ng, const uint8_t* w, int64_t row_bytes,
         const float* scales, const float* zs, int64_t group, float* y, int64_t N) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
      rows<BITS, 4>(x + m * kp, kp, xsum + m * ng, ng, w, row_bytes, scales, zs, kp, group, y + m * N, N, n0, n1);
    for (; m + 2 <= M; m += 2)
      rows<BITS, 2>(x + m * kp, kp, xsum + m * ng, ng, w, row_bytes, scales, zs, kp, group, y + m * N, N, n0, n1);
    for (; m < M; ++m)
      rows<BITS, 1>(x + m * kp, kp, xsum + m * ng, ng, w, row_bytes, scales, zs, kp, group, y + m * N, N, n0, n1);
  });
}


// ---- int8-activation path (llama.cpp-style): x quantized per segment to int8, u8 x s8 dot products ----
//
// Codes are expanded to 32 unsigned bytes per block (same weight layouts as above) and multiplied
// with the int8 activations by _mm256_maddubs_epi16 (32 multiply-adds per instruction into int16
// pairs), summed to int32 with _mm256_madd_epi16. 8-bit codes do not fit maddubs' int16 pairs
// unsigned (255 * 127 * 2 > 32767), so they are offset to q - 128 and use the sign trick
// |w| * sign(x, w). Per segment of XB input channels x has one scale sx = amax / 127:
//   y = sum_seg sx_seg * s_g(seg) * (q . xq)_seg - sum_g (z_g - off) * s_g * xsum_g,
//   xsum_g = sum over the group's segments of sx_seg * sum(xq_seg)   (off = 128 for 8-bit, else 0)
// which is exactly dequant(W) . x~ with x~ = sx * xq, the int8-rounded activations.

// int16 pair sums of one block: codes (u8) x activations (s8)
template <int BITS>
inline __m256i dot16(__m256i w, __m256i xq) {
  if constexpr (BITS == 8) {
    const __m256i ws = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80));  // q - 128 as int8
    return _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(xq, ws));
  } else {
    return _mm256_maddubs_epi16(w, xq);
  }
}

// A segment has at most 4 blocks (XB <= 128), whose int16 pair sums add without overflow below 8 bits
// (4 * 2 * 15 * 127 < 32767): one widening per segment. 8-bit pairs can reach 2 * 128 * 127: widened per block.

struct I8Args {
  const int8_t* xq; const float* sx; const float* xsum_t; int64_t M, kp, nseg, ng, xb;
  const uint8_t* w; int64_t row_bytes; const float* scales; const float* zs; int64_t group; float off;
  float* y; int64_t N;
};

// Rows [n0, n1) of W's 2/3/4-bit codes expanded to one byte each (the int8 path's 32-byte blocks, kp bytes a
// row) ahead of a pass of many x rows over them: the expansion is paid once per row of W instead of once per
// four rows of x. (8-bit codes are bytes already; expanding their sign-trick operands measured no gain.)
template <int BITS>
void expand_rows(const I8Args& a, int64_t n0, int64_t n1, uint8_t* out) {
  static_assert(BITS != 8, "8-bit codes are not expanded");
  constexpr int BB = block_bytes(BITS);
  const int64_t n_blocks = a.kp / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = a.w + n * a.row_bytes;
    uint8_t* o = out + (n - n0) * a.kp;
    for (int64_t b = 0; b < n_blocks; ++b) _mm256_storeu_si256((__m256i*)(o + b * 32), codes32<BITS>(wr + b * BB));
  }
}

// The MT sums of v[0..MT) (MT <= 4) in the low lanes of one 128-bit vector.
template <int MT>
inline __m128 hsum_rows(const __m256 v[MT]) {
  __m256 h;
  if constexpr (MT == 4) {
    h = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  } else if constexpr (MT == 2) {
    const __m256 t = _mm256_hadd_ps(v[0], v[1]);
    h = _mm256_hadd_ps(t, t);
  } else {
    const __m256 t = _mm256_hadd_ps(v[0], v[0]);
    h = _mm256_hadd_ps(t, t);
  }
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Rows [n0, n1) of W against MT rows of x from m0: each block of 32 codes is expanded once and used for
// MT rows; per segment the int16 sums widen to int32 once, convert to fp32 and take the segment's
// scale s_g * sx[m, seg] in one FMA. Registers: MT accumulators + MT fp32 sums + the block + x.
// EX: the codes come already expanded, `ex` holding expand_rows of rows [n0, n1).
template <int BITS, int MT, bool EX>
void rows_i8(const I8Args& a, int64_t m0, int64_t n0, int64_t n1, const uint8_t* ex) {
  constexpr int BB = block_bytes(BITS);
  const int64_t n_blocks = a.kp / 32, bps = a.xb / 32, segs_per_group = a.group / a.xb;
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xr[MT];
  const float* sxr[MT];
  for (int m = 0; m < MT; ++m) {
    xr[m] = a.xq + (m0 + m) * a.kp;
    sxr[m] = a.sx + (m0 + m) * a.nseg;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = EX ? ex + (n - n0) * a.kp : a.w + n * a.row_bytes;
    const float* sr = a.scales + n * a.ng;
    __m256 facc[MT];
    for (int m = 0; m < MT; ++m) facc[m] = _mm256_setzero_ps();
    int64_t b = 0, g = 0, seg_in_group = 0;  // counters, not divisions: this loop runs per segment
    for (int64_t seg = 0; seg < a.nseg; ++seg) {
      const int64_t b1 = std::min(b + bps, n_blocks);
      __m256i acc[MT];  // int16 pair sums (8-bit: int32)
      for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_si256();
      auto block = [&](int64_t bb) __attribute__((always_inline)) {
        const __m256i wv = EX ? _mm256_loadu_si256((const __m256i*)(wr + bb * 32)) : codes32<BITS>(wr + bb * BB);
        for (int m = 0; m < MT; ++m) {
          const __m256i p = dot16<BITS>(wv, _mm256_loadu_si256((const __m256i*)(xr[m] + bb * 32)));
          if constexpr (BITS == 8)
            acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(p, ones));
          else
            acc[m] = _mm256_add_epi16(acc[m], p);
        }
      };
      if (b1 - b == 4) {  // a whole 128-channel segment: fixed trip count, unrolled (decode: 7 instructions a block)
        block(b), block(b + 1), block(b + 2), block(b + 3);
        b += 4;
      } else {
        for (; b < b1; ++b) block(b);
      }
      const __m256 sw = _mm256_set1_ps(sr[g]);
      if (++seg_in_group == segs_per_group) {
        seg_in_group = 0;
        ++g;
      }
      for (int m = 0; m < MT; ++m) {
        const __m256i a32 = BITS == 8 ? acc[m] : _mm256_madd_epi16(acc[m], ones);
        facc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a32), _mm256_mul_ps(sw, _mm256_broadcast_ss(sxr[m] + seg)),
                                  facc[m]);
      }
    }
    // zero-point term for the MT rows at once: xsum_t is [n_groups, M], so rows m0.. of a group are adjacent
    const float* zr = a.zs + n * a.ng;
    __m128 zt = _mm_setzero_ps();
    int64_t gg = 0;
    if (MT == 1 && a.M == 1) {  // decode: one row's group sums are contiguous, 8 groups per FMA
      __m256 z8 = _mm256_setzero_ps();
      const __m256 off = _mm256_set1_ps(a.off);
      for (; gg + 8 <= a.ng; gg += 8)
        z8 = _mm256_fmadd_ps(_mm256_fnmadd_ps(off, _mm256_loadu_ps(sr + gg), _mm256_loadu_ps(zr + gg)),
                             _mm256_loadu_ps(a.xsum_t + gg), z8);
      zt = _mm_set_ss(hsum(z8));
    }
    for (; gg < a.ng; ++gg) {
      const __m128 c = _mm_set1_ps(zr[gg] - a.off * sr[gg]);
      const float* xs = a.xsum_t + gg * a.M + m0;
      __m128 xv;
      if constexpr (MT == 4) xv = _mm_loadu_ps(xs);
      else if constexpr (MT == 2) xv = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i*)xs));
      else xv = _mm_load_ss(xs);
      zt = _mm_fmadd_ps(c, xv, zt);
    }
    alignas(16) float out[4];
    _mm_store_ps(out, _mm_sub_ps(hsum_rows<MT>(facc), zt));
    for (int m = 0; m < MT; ++m) a.y[(m0 + m) * a.N + n] = out[m];
  }
}

// From this many rows of x on, codes are expanded once per chunk of W (expand_rows). Measured in one process
// against the unexpanded loop (docs/cpu.md): 3-bit codes, whose expansion costs the most, gain 1.03-1.15x at
// M = 6 and 1.3-1.56x at M = 256; 2/4-bit lose up to 12% at M = 8, are mixed at 12-16 and gain 1.03-1.13x at 32.
constexpr int64_t expand_from_m(int bits) { return bits == 3 ? 6 : 32; }

template <int BITS, bool EX>
void run_i8_rows(const I8Args& a, int64_t M, int64_t chunk_bytes) {
  // Rows of W in chunks that stay in L2 while every row of x passes over them (M > 4 re-reads W M / 4 times)
  const int64_t chunk = std::max<int64_t>(16, (int64_t)(96 << 10) / std::max<int64_t>(1, chunk_bytes));
  at::parallel_for(0, a.N, 16, [&](int64_t r0, int64_t r1) {
    thread_local std::vector<uint8_t> ex_buf;  // per OpenMP thread, kept across calls like the x scratch
    if constexpr (EX) {
      const size_t need = (size_t)(std::min(chunk, r1 - r0) * chunk_bytes);
      if (ex_buf.size() < need) ex_buf.resize(need);
    }
    for (int64_t n0 = r0; n0 < r1; n0 += chunk) {
      const int64_t n1 = std::min(r1, n0 + chunk);
      const uint8_t* ex = nullptr;
      if constexpr (EX) {
        expand_rows<BITS>(a, n0, n1, ex_buf.data());
        ex = ex_buf.data();
      }
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) rows_i8<BITS, 4, EX>(a, m, n0, n1, ex);
      for (; m + 2 <= M; m += 2) rows_i8<BITS, 2, EX>(a, m, n0, n1, ex);
      for (; m < M; ++m) rows_i8<BITS, 1, EX>(a, m, n0, n1, ex);
    }
  });
}

template <int BITS>
void run_i8(const I8Args& a, int64_t M) {
  if constexpr (BITS != 8) {
    if (M >= expand_from_m(BITS)) return run_i8_rows<BITS, true>(a, M, a.kp);
  }
  run_i8_rows<BITS, false>(a, M, a.row_bytes);
}

// the largest segment in {128, 96, 64, 32} that divides the group (x gets one int8 scale per segment)
inline int64_t segment_for(int64_t group) {
  for (int64_t s : {128, 96, 64, 32})
    if (group % s == 0) return s;
  return 32;
}

// Per-thread scratch (rounded activations, group sums) is kept between calls up to this many floats
// (16 MiB: a decode or prefill chunk of a 1B-8B model); a larger call's buffer is released after it.
constexpr size_t kKeepScratch = 4u << 20;

// The argument contract shared by gemv and gemv_i8 (see gemv's comment).
inline void check_args(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales,
                       const torch::Tensor& zs, int64_t bits, int64_t group) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x: contiguous fp32 [M, Kp]");
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.is_contiguous(), "w: contiguous uint8");
  TORCH_CHECK(scales.is_contiguous() && zs.is_contiguous() && scales.dtype() == torch::kFloat32, "scales: fp32");
  const int64_t kp = x.size(1), ng = scales.size(1);
  TORCH_CHECK(kp % 32 == 0 && group % 32 == 0, "Kp and group must be multiples of 32");
  TORCH_CHECK(w.size(1) == kp / 32 * block_bytes((int)bits), "w row bytes do not match Kp and bits");
  TORCH_CHECK(ng == (kp + group - 1) / group, "n_groups does not match Kp / group");
}

// The whole per-call input handling in C++ (a decode step calls every layer once per token, and each
// tensor op issued from Python costs about a microsecond): x [..., K] of any float dtype -> fp32
// [M, Kp], act-order permuted, zero padded to Kp.
torch::Tensor kernel_input(const torch::Tensor& x, int64_t kp, const c10::optional<torch::Tensor>& perm) {
  auto xs = x.reshape({-1, x.size(-1)});
  if (xs.scalar_type() != torch::kFloat32) xs = xs.to(torch::kFloat32);
  if (perm.has_value()) xs = xs.index_select(1, *perm);
  if (xs.size(1) < kp) xs = torch::constant_pad_nd(xs, {0, kp - xs.size(1)});
  return xs.contiguous();
}

// fp32 [M, N] -> x's leading shape and dtype, bias added
torch::Tensor kernel_output(torch::Tensor y, const torch::Tensor& x, const c10::optional<torch::Tensor>& bias) {
  if (bias.has_value()) y.add_(bias->to(torch::kFloat32));
  auto shape = x.sizes().vec();
  shape.back() = y.size(1);
  if (y.scalar_type() != x.scalar_type()) y = y.to(x.scalar_type());
  return y.view(shape);
}

}  // namespace

// Same arguments as gemv; activations are rounded to int8 per segment inside (see above).
torch::Tensor gemv_i8(torch::Tensor x_in, torch::Tensor w, torch::Tensor scales, torch::Tensor zs, int64_t bits,
                      int64_t group, int64_t kp_, c10::optional<torch::Tensor> perm, c10::optional<torch::Tensor> bias) {
  const auto x = kernel_input(x_in, kp_, perm);
  check_args(x, w, scales, zs, bits, group);
  const int64_t M = x.size(0), kp = x.size(1), N = w.size(0), ng = scales.size(1);
  const int64_t xb = segment_for(group), nseg = (kp + xb - 1) / xb;
  // The rounded activations live in a per-thread scratch buffer, not in tensors: on a small layer (SmolLM2's
  // 192x576 decode step, ~4 us of work) three tensor allocations per call were a visible share of it.
  // Layout: sx [M, nseg] fp32, xsum [ng, M] fp32 (transposed: see rows_i8), then xq [M, Kp] int8.
  thread_local std::vector<float> scratch;  // released again after a call that needed more than kKeepScratch
  const size_t n_floats = (size_t)(M * nseg + ng * M), n_total = n_floats + (size_t)(M * kp + 3) / 4;
  if (scratch.size() < n_total) scratch.resize(n_total);
  float* const sx_buf = scratch.data();
  float* const xsum_buf = sx_buf + M * nseg;
  int8_t* const xq_buf = reinterpret_cast<int8_t*>(sx_buf + n_floats);
  std::fill(xsum_buf, xsum_buf + ng * M, 0.f);
  {
    const float* xr = x.data_ptr<float>();
    int8_t* xq = xq_buf;
    float* sx = sx_buf;
    float* xs = xsum_buf;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t s = 0; s < nseg; ++s) {
        const int64_t k0 = s * xb, k1 = std::min(kp, k0 + xb);
        const float* xp = xr + m * kp;
        __m256 mx = _mm256_setzero_ps();
        for (int64_t k = k0; k < k1; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(xp + k), absmask));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float amax = _mm_cvtss_f32(h);
        const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        // round half to even (the default MXCSR mode, as nearbyint); |x * inv| <= 127 up to one ulp
        const __m256 vinv = _mm256_set1_ps(inv);
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        __m256i vsum = _mm256_setzero_si256();
        for (int64_t k = k0; k < k1; k += 32) {
          __m256i q[4];
          for (int t = 0; t < 4; ++t) {
            q[t] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xp + k + 8 * t), vinv));
            vsum = _mm256_add_epi32(vsum, q[t]);
          }
          // packs work per 128-bit lane: dwords come out as q0[0:4] q1[0:4] q2[0:4] q3[0:4] | q0[4:8] ...
          const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
          _mm256_storeu_si256((__m256i*)(xq + m * kp + k), _mm256_permutevar8x32_epi32(b, order));
        }
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(vsum), _mm256_extracti128_si256(vsum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        const int32_t isum = _mm_cvtsi128_si32(s4);
        sx[m * nseg + s] = scale;
        xs[(k0 / group) * M + m] += scale * (float)isum;
      }
  }
  auto y = torch::empty({M, N}, x.options());
  I8Args a{xq_buf, sx_buf, xsum_buf, M, kp, nseg, ng, xb,
           w.data_ptr<uint8_t>(), w.size(1), scales.data_ptr<float>(), zs.data_ptr<float>(), group,
           bits == 8 ? 128.f : 0.f, y.data_ptr<float>(), N};
  switch (bits) {
    case 2: run_i8<2>(a, M); break;
    case 3: run_i8<3>(a, M); break;
    case 4: run_i8<4>(a, M); break;
    case 8: run_i8<8>(a, M); break;
    default: TORCH_CHECK(false, "bits must be 2, 3, 4 or 8");
  }
  if (scratch.size() > kKeepScratch) std::vector<float>().swap(scratch);
  return kernel_output(y, x_in, bias);
}

// x: [..., K] float (K <= Kp, Kp % 32 == 0: zero padded inside; perm: act-order channel order of the
// layout); w: uint8 [N, Kp / 32 * block_bytes]; scales, zs: fp32 [N, n_groups] (zs = zero * scale);
// group % 32 == 0; bias [N] or None. Returns [..., N] in x's dtype.
torch::Tensor gemv(torch::Tensor x_in, torch::Tensor w, torch::Tensor scales, torch::Tensor zs, int64_t bits,
                   int64_t group, int64_t kp_, c10::optional<torch::Tensor> perm, c10::optional<torch::Tensor> bias) {
  const auto x = kernel_input(x_in, kp_, perm);
  check_args(x, w, scales, zs, bits, group);
  const int64_t M = x.size(0), kp = x.size(1), N = w.size(0), ng = scales.size(1);
  thread_local std::vector<float> xsum;  // [M, n_groups]: sum of x over each group (scratch, as in gemv_i8)
  if (xsum.size() < (size_t)(M * ng)) xsum.resize(M * ng);
  {
    const float* xr = x.data_ptr<float>();
    float* xs = xsum.data();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t k1 = std::min(kp, (g + 1) * group);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t k = g * group; k < k1; k += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(xr + m * kp + k));
        xs[m * ng + g] = hsum(acc);
      }
  }
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* xs = xsum.data();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zs.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t rb = w.size(1);
  switch (bits) {
    case 2: run<2>(xp, M, kp, xs, ng, wp, rb, sp, zp, group, yp, N); break;
    case 3: run<3>(xp, M, kp, xs, ng, wp, rb, sp, zp, group, yp, N); break;
    case 4: run<4>(xp, M, kp, xs, ng, wp, rb, sp, zp, group, yp, N); break;
    case 8: run<8>(xp, M, kp, xs, ng, wp, rb, sp, zp, group, yp, N); break;
    default: TORCH_CHECK(false, "bits must be 2, 3, 4 or 8");
  }
  if (xsum.size() > kKeepScratch) std::vector<float>().swap(xsum);
  return kernel_output(y, x_in, bias);
}


// Rows [n0, n1) of dequant(W) as fp32 [n1 - n0, Kp]: for large M, where an fp32 GEMM on a dequantized
// tile beats unpacking per row of x. Same layouts and scales as gemv.
torch::Tensor dequant_rows(torch::Tensor w, torch::Tensor scales, torch::Tensor zs, int64_t bits, int64_t group,
                           int64_t n0, int64_t n1) {
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.is_contiguous(), "w: contiguous uint8");
  TORCH_CHECK(scales.is_contiguous() && zs.is_contiguous() && scales.dtype() == torch::kFloat32, "scales: fp32");
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= w.size(0), "row range out of bounds");
  const int64_t rb = w.size(1), kp = rb / block_bytes((int)bits) * 32, ng = scales.size(1);
  TORCH_CHECK(group % 32 == 0 && ng == (kp + group - 1) / group, "n_groups does not match Kp / group");
  auto out = torch::empty({n1 - n0, kp}, scales.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zs.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t bpg = group / 32;
  at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      const uint8_t* wr = wp + n * rb;
      float* orow = op + (n - n0) * kp;
      for (int64_t blk = 0, g = 0, in_g = 0; blk < kp / 32; ++blk) {  // g = blk / bpg, counted
        const __m256 s = _mm256_set1_ps(sp[n * ng + g]), z = _mm256_set1_ps(zp[n * ng + g]);
        if (++in_g == bpg) {
          in_g = 0;
          ++g;
        }
        __m256 v[4];
        switch (bits) {
          case 2: decode32<2>(wr + blk * 8, v); break;
          case 3: decode32<3>(wr + blk * 12, v); break;
          case 4: decode32<4>(wr + blk * 16, v); break;
          default: decode32<8>(wr + blk * 32, v); break;
        }
        for (int t = 0; t < 4; ++t) _mm256_storeu_ps(orow + blk * 32 + 8 * t, _mm256_fmsub_ps(v[t], s, z));
      }
    }
  });
  return out;
}

// Large M: tiles of rows of W dequantized to fp32 (at most kTileBytes alive) and multiplied with torch's
// fp32 GEMM; the reference's math up to summation order. Same arguments and return as gemv.
torch::Tensor gemm_dq(torch::Tensor x_in, torch::Tensor w, torch::Tensor scales, torch::Tensor zs, int64_t bits,
                      int64_t group, int64_t kp_, c10::optional<torch::Tensor> perm, c10::optional<torch::Tensor> bias) {
  constexpr int64_t kTileBytes = 8 << 20;  // bounded extra memory, stays in the last-level cache
  const auto x = kernel_input(x_in, kp_, perm);
  check_args(x, w, scales, zs, bits, group);
  const int64_t N = w.size(0), kp = x.size(1);
  const int64_t rows = std::max<int64_t>(16, kTileBytes / (4 * kp));
  if (rows >= N)  // one tile: exactly dense's GEMM (x @ W^T into y), no transposed result to copy back
    return kernel_output(at::linear(x, dequant_rows(w, scales, zs, bits, group, 0, N)), x_in, bias);
  auto yt = torch::empty({N, x.size(0)}, x.options());  // y^T: each tile writes contiguous rows
  const auto xt = x.t();
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n1 = std::min(N, n0 + rows);
    auto out = yt.narrow(0, n0, n1 - n0);
    at::mm_out(out, dequant_rows(w, scales, zs, bits, group, n0, n1), xt);
  }
  return kernel_output(yt.t().contiguous(), x_in, bias);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "packed low-bit GEMV/GEMM (AVX2, fp32 activations)");
  m.def("gemv_i8", &gemv_i8, "packed low-bit GEMV/GEMM (AVX2, int8-rounded activations)");
  m.def("dequant_rows", &dequant_rows, "rows of the dequantized weight, fp32 (AVX2)");
  m.def("gemm_dq", &gemm_dq, "dequantized tiles of W times x through torch's fp32 GEMM");
}
