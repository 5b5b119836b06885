// CPU inner loops written with GCC vector extensions so that -march picks the instruction set
// (AVX2/FMA, AVX-512 or SSE) without intrinsics in the algorithm.
#include "engine/backends/cpu/cpu_kernels.h"

#include <cmath>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace tandem::cpu {
namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

inline v8f LoadF32(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline v8f LoadBf16(const uint16_t* p) {
  v8h h;
  std::memcpy(&h, p, sizeof(h));
  v8u u = __builtin_convertvector(h, v8u) << 16;
  v8f f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline v8f LoadF16(const uint16_t* p) {
#if defined(__F16C__)
  __m256 r = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  v8f f;
  std::memcpy(&f, &r, sizeof(f));
  return f;
#else
  v8f f;
  for (int i = 0; i < 8; ++i) f[i] = F16ToF32(p[i]);
  return f;
#endif
}

inline float HSum(v8f v) {
  // Fixed pairwise order: the same for every call site.
  const float a = (v[0] + v[4]) + (v[2] + v[6]);
  const float b = (v[1] + v[5]) + (v[3] + v[7]);
  return a + b;
}

template <DType kW>
inline v8f LoadW(const void* w, int64_t i) {
  if constexpr (kW == DType::kF32) {
    return LoadF32(static_cast<const float*>(w) + i);
  } else if constexpr (kW == DType::kBF16) {
    return LoadBf16(static_cast<const uint16_t*>(w) + i);
  } else {
    return LoadF16(static_cast<const uint16_t*>(w) + i);
  }
}

template <DType kW>
inline float LoadWScalar(const void* w, int64_t i) {
  if constexpr (kW == DType::kF32) {
    return static_cast<const float*>(w)[i];
  } else if constexpr (kW == DType::kBF16) {
    return Bf16ToF32(static_cast<const uint16_t*>(w)[i]);
  } else {
    return F16ToF32(static_cast<const uint16_t*>(w)[i]);
  }
}

inline const void* RowPtr(const void* w, DType wtype, int64_t row, int64_t K) {
  return static_cast<const std::byte*>(w) + static_cast<size_t>(row) * K * DTypeSize(wtype);
}

// MR rows of x against NR rows of w. Every (m, n) accumulator sees k in the same order, and the
// tail is added after the same horizontal sum, so results do not depend on MR.
template <DType kW, int MR, int NR, bool kPrefetch>
inline void MicroKernel(const float* x, int64_t ldx, const void* const* wrows, int64_t K, float* y,
                        int64_t ldy) {
  v8f acc[MR][NR];
  for (int m = 0; m < MR; ++m) {
    for (int n = 0; n < NR; ++n) acc[m][n] = v8f{};
  }
  const int64_t K8 = K & ~int64_t{7};
  // Software prefetch 8 KB ahead in every weight row: rows are short (a few KB), too short for
  // the hardware prefetcher to ramp up on its own. Only the first pass over a row group
  // prefetches; later row blocks find the rows in cache.
  constexpr int64_t kAhead = 8192 / static_cast<int64_t>(DTypeSize(kW));  // elements
  for (int64_t k = 0; k < K8; k += 8) {
    if (kPrefetch && ((k * static_cast<int64_t>(DTypeSize(kW))) & 63) == 0) {  // once a line
      for (int n = 0; n < NR; ++n) {
        __builtin_prefetch(static_cast<const std::byte*>(wrows[n]) + (k + kAhead) * DTypeSize(kW));
      }
    }
    v8f wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = LoadW<kW>(wrows[n], k);
    for (int m = 0; m < MR; ++m) {
      const v8f xv = LoadF32(x + m * ldx + k);
      for (int n = 0; n < NR; ++n) acc[m][n] += xv * wv[n];
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int n = 0; n < NR; ++n) {
      float s = HSum(acc[m][n]);
      for (int64_t k = K8; k < K; ++k) s += x[m * ldx + k] * LoadWScalar<kW>(wrows[n], k);
      y[m * ldy + n] = s;
    }
  }
}

template <DType kW, int NR>
inline void RowsBlock(const float* x, int64_t M, int64_t ldx, const void* const* wrows, int64_t K,
                      float* y, int64_t ldy) {
  int64_t m = 0;
  if (M >= 4) {
    MicroKernel<kW, 4, NR, true>(x, ldx, wrows, K, y, ldy);
    m = 4;
  } else {
    MicroKernel<kW, 1, NR, true>(x, ldx, wrows, K, y, ldy);
    m = 1;
  }
  for (; m + 4 <= M; m += 4) {
    MicroKernel<kW, 4, NR, false>(x + m * ldx, ldx, wrows, K, y + m * ldy, ldy);
  }
  for (; m < M; ++m) MicroKernel<kW, 1, NR, false>(x + m * ldx, ldx, wrows, K, y + m * ldy, ldy);
}

template <DType kW>
void LinearRowsT(const float* x, int64_t M, int64_t ldx, const void* w, int64_t K,
                 int64_t n_begin, int64_t n_end, float* y, int64_t ldy) {
  // Block over m so that a slab of x stays in cache while w streams past it.
  constexpr int64_t kMBlock = 64;
  for (int64_t m0 = 0; m0 < M; m0 += kMBlock) {
    const int64_t mb = std::min(kMBlock, M - m0);
    int64_t n = n_begin;
    for (; n + 4 <= n_end; n += 4) {
      const void* rows[4] = {RowPtr(w, kW, n, K), RowPtr(w, kW, n + 1, K), RowPtr(w, kW, n + 2, K),
                             RowPtr(w, kW, n + 3, K)};
      RowsBlock<kW, 4>(x + m0 * ldx, mb, ldx, rows, K, y + m0 * ldy + n, ldy);
    }
    for (; n < n_end; ++n) {
      const void* rows[1] = {RowPtr(w, kW, n, K)};
      RowsBlock<kW, 1>(x + m0 * ldx, mb, ldx, rows, K, y + m0 * ldy + n, ldy);
    }
  }
}

}  // namespace

void LinearRows(const float* x, int64_t M, int64_t ldx, const void* w, DType wtype, int64_t K,
                int64_t n_begin, int64_t n_end, float* y, int64_t ldy) {
  switch (wtype) {
    case DType::kF32:
      return LinearRowsT<DType::kF32>(x, M, ldx, w, K, n_begin, n_end, y, ldy);
    case DType::kBF16:
      return LinearRowsT<DType::kBF16>(x, M, ldx, w, K, n_begin, n_end, y, ldy);
    case DType::kF16:
      return LinearRowsT<DType::kF16>(x, M, ldx, w, K, n_begin, n_end, y, ldy);
  }
}

float Dot(const float* a, const float* b, int64_t n) {
  v8f acc = v8f{};
  const int64_t n8 = n & ~int64_t{7};
  for (int64_t i = 0; i < n8; i += 8) acc += LoadF32(a + i) * LoadF32(b + i);
  float s = HSum(acc);
  for (int64_t i = n8; i < n; ++i) s += a[i] * b[i];
  return s;
}

void LoadRow(const void* w, DType wtype, int64_t n, float* out) { ToF32(wtype, w, out, n); }

void RmsNorm(const float* x, const void* weight, DType wtype, int64_t n, float eps, float* out) {
  const float ss = Dot(x, x, n);
  const float scale = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  switch (wtype) {
    case DType::kF32:
      for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * LoadWScalar<DType::kF32>(weight, i);
      break;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * LoadWScalar<DType::kBF16>(weight, i);
      break;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * LoadWScalar<DType::kF16>(weight, i);
      break;
  }
}

void Axpy(float s, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += s * x[i];
}

}  // namespace tandem::cpu
