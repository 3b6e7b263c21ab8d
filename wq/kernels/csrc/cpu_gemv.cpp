// AVX2 GEMV / small GEMM for packed low-bit weights: y[M, N] = x[M, K] @ dequant(W)[N, K]^T.
//
// Weights are stored per output row in blocks of 32 input channels, in layouts that AVX2 unpacks
// with a few shifts and masks (the Python side, wq/kernels/cpu_native.py, writes them):
//   8-bit: 32 bytes, byte j = code j
//   4-bit: 16 bytes, byte j = code j | code (j + 16) << 4
//   2-bit:  8 bytes, byte j = code j | code (j + 8) << 2 | code (j + 16) << 4 | code (j + 24) << 6
//   3-bit: the 2-bit layout of the low two bits (8 bytes), then a 32-bit plane of bit 2 (bit j = code j)
// Dequantization w = (q - z) * s is folded: y = sum_g s_g * (q_g . x_g) - (z_g * s_g) * sum(x_g),
// with fp32 accumulation. Rows are split over torch's intra-op threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

inline __m256 u8x8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

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
  } else {
    const __m128i m2 = _mm_set1_epi8(0x03);
    __m128i v = _mm_loadl_epi64((const __m128i*)p);
    __m128i c[4] = {_mm_and_si128(v, m2), _mm_and_si128(_mm_srli_epi16(v, 2), m2),
                    _mm_and_si128(_mm_srli_epi16(v, 4), m2), _mm_and_si128(_mm_srli_epi16(v, 6), m2)};
    if constexpr (BITS == 3) {
      uint32_t plane;
      std::memcpy(&plane, p + 8, 4);
      const __m128i sel = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, (char)128, 0, 0, 0, 0, 0, 0, 0, 0);
      const __m128i four = _mm_set1_epi8(4);
      for (int t = 0; t < 4; ++t) {
        __m128i b = _mm_set1_epi8((char)((plane >> (8 * t)) & 0xFF));
        __m128i hit = _mm_cmpeq_epi8(_mm_and_si128(b, sel), sel);
        c[t] = _mm_or_si128(c[t], _mm_and_si128(hit, four));
      }
    }
    for (int t = 0; t < 4; ++t) out[t] = u8x8_to_ps(c[t]);
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

}  // namespace

// x: fp32 [M, Kp] (Kp % 32 == 0, zero padded); w: uint8 [N, Kp / 32 * block_bytes];
// scales, zs: fp32 [N, n_groups] (zs = zero * scale); group % 32 == 0. Returns fp32 [M, N].
torch::Tensor gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor zs, int64_t bits,
                   int64_t group) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x: contiguous fp32 [M, Kp]");
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.is_contiguous(), "w: contiguous uint8");
  TORCH_CHECK(scales.is_contiguous() && zs.is_contiguous() && scales.dtype() == torch::kFloat32, "scales: fp32");
  const int64_t M = x.size(0), kp = x.size(1), N = w.size(0), ng = scales.size(1);
  TORCH_CHECK(kp % 32 == 0 && group % 32 == 0, "Kp and group must be multiples of 32");
  TORCH_CHECK(w.size(1) == kp / 32 * block_bytes((int)bits), "w row bytes do not match Kp and bits");
  TORCH_CHECK(ng == (kp + group - 1) / group, "n_groups does not match Kp / group");
  auto xsum = torch::empty({M, ng}, x.options());  // [M, n_groups]: sum of x over each group
  {
    const float* xr = x.data_ptr<float>();
    float* xs = xsum.data_ptr<float>();
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
  const float* xs = xsum.data_ptr<float>();
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
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gemv", &gemv, "packed low-bit GEMV/GEMM (AVX2)"); }
