// Kernels of the GPU backends (CUDA, and HIP through vendor_hip.h). fp32 arithmetic throughout;
// bf16/f16 only as storage. Warps are logical 32-lane groups (width 32 in every shuffle), which
// also holds on 64-wide AMD wavefronts.
#include "engine/backends/cuda/kernels.h"

#include <algorithm>
#include <cmath>

namespace tandem::gpu {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- element conversion -------------------------------------------------------------------

__device__ __forceinline__ float Bf16Bits(uint16_t h) {
  return __uint_as_float(static_cast<uint32_t>(h) << 16);
}

// Round to nearest even; NaN stays a quiet NaN (same as kvcache/dtype.h).
__device__ __forceinline__ uint16_t ToBf16Bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<uint16_t>((u >> 16) | 0x40u);
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

__device__ __forceinline__ float F16Bits(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ uint16_t ToF16Bits(float f) {
  return __half_as_ushort(__float2half_rn(f));
}

template <DType kT>
struct Elem;
template <>
struct Elem<DType::kF32> {
  using Storage = float;
  static __device__ __forceinline__ float Load(const float* p, int64_t i) { return p[i]; }
  static __device__ __forceinline__ void Store(float* p, int64_t i, float v) { p[i] = v; }
};
template <>
struct Elem<DType::kBF16> {
  using Storage = uint16_t;
  static __device__ __forceinline__ float Load(const uint16_t* p, int64_t i) {
    return Bf16Bits(p[i]);
  }
  static __device__ __forceinline__ void Store(uint16_t* p, int64_t i, float v) {
    p[i] = ToBf16Bits(v);
  }
};
template <>
struct Elem<DType::kF16> {
  using Storage = uint16_t;
  static __device__ __forceinline__ float Load(const uint16_t* p, int64_t i) {
    return F16Bits(p[i]);
  }
  static __device__ __forceinline__ void Store(uint16_t* p, int64_t i, float v) {
    p[i] = ToF16Bits(v);
  }
};

// Runtime-typed access for kernels where the dtype switch is not on a hot inner loop.
__device__ __forceinline__ float LoadAny(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kBF16:
      return Bf16Bits(static_cast<const uint16_t*>(p)[i]);
    case DType::kF16:
      return F16Bits(static_cast<const uint16_t*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void StoreAny(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kBF16:
      static_cast<uint16_t*>(p)[i] = ToBf16Bits(v);
      break;
    case DType::kF16:
      static_cast<uint16_t*>(p)[i] = ToF16Bits(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
      break;
  }
}

// Writes one activation into a GEMM input (hi, and lo when split).
__device__ __forceinline__ void StoreAct(const ActOut& out, int64_t i, float v) {
  switch (out.dtype) {
    case DType::kBF16: {
      const uint16_t hi = ToBf16Bits(v);
      static_cast<uint16_t*>(out.data)[i] = hi;
      if (out.lo_offset > 0) {
        static_cast<uint16_t*>(out.data)[i + out.lo_offset] = ToBf16Bits(v - Bf16Bits(hi));
      }
      break;
    }
    case DType::kF16: {
      const uint16_t hi = ToF16Bits(v);
      static_cast<uint16_t*>(out.data)[i] = hi;
      if (out.lo_offset > 0) {
        static_cast<uint16_t*>(out.data)[i + out.lo_offset] = ToF16Bits(v - F16Bits(hi));
      }
      break;
    }
    default:
      static_cast<float*>(out.data)[i] = v;
      break;
  }
}

__device__ __forceinline__ float LoadFolded(const FoldedIn& in, int64_t i) {
  float v = in.data[i];
  if (in.lo_offset > 0) {
    v += in.data[i + in.lo_offset];
  }
  return v;
}

// ---- reductions -----------------------------------------------------------------------------

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, o, kWarp);
  }
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o, kWarp));
  }
  return v;
}

// Sum over the block; every thread gets the result. blockDim.x must be a multiple of 32, <= 1024.
__device__ float BlockSum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  v = WarpSum(v);
  if (lane == 0) {
    partial[warp] = v;
  }
  __syncthreads();
  const int num_warps = blockDim.x / kWarp;
  float t = lane < num_warps ? partial[lane] : 0.0f;
  t = WarpSum(t);
  __syncthreads();  // partial may be reused by a later call
  return t;
}

// ---- elementwise and row kernels ---------------------------------------------------------------

__global__ void EmbeddingKernel(const int32_t* ids, const void* table, DType type, int32_t hidden,
                                float* x) {
  const int64_t r = blockIdx.x;
  const int64_t src = static_cast<int64_t>(ids[r]) * hidden;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
    x[r * hidden + c] = LoadAny(table, type, src + c);
  }
}

__global__ void RopeCosSinKernel(const int32_t* positions, int64_t rows, const float* inv_freq,
                                 int32_t half, float* cos_sin) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * half) {
    return;
  }
  const int64_t r = i / half;
  const int32_t f = static_cast<int32_t>(i % half);
  // An fp32 product, as the reference computes it; __fmul_rn keeps it a plain rounded multiply.
  const float angle = __fmul_rn(inv_freq[f], static_cast<float>(positions[r]));
  float* row = cos_sin + r * 2 * half;
  row[f] = static_cast<float>(cos(static_cast<double>(angle)));
  row[half + f] = static_cast<float>(sin(static_cast<double>(angle)));
}

__global__ void AddRmsNormKernel(RmsNormArgs a) {
  const int64_t out_row = blockIdx.x;
  const int64_t src = a.src_rows != nullptr ? a.src_rows[out_row] : out_row;
  float* x = a.x + src * a.n;
  const int64_t delta_base = src * a.n;
  float ss = 0.0f;
  for (int c = threadIdx.x; c < a.n; c += blockDim.x) {
    float v = x[c];
    if (a.delta.data != nullptr) {
      v += LoadFolded(a.delta, delta_base + c);
    }
    if (a.update_x) {
      x[c] = v;
    }
    ss += v * v;
  }
  ss = BlockSum(ss);
  const float scale = 1.0f / sqrtf(ss / static_cast<float>(a.n) + a.eps);
  for (int c = threadIdx.x; c < a.n; c += blockDim.x) {
    float v = x[c];  // this thread's own write when update_x
    if (!a.update_x && a.delta.data != nullptr) {
      v += LoadFolded(a.delta, delta_base + c);
    }
    StoreAct(a.out, out_row * a.n + c, v * scale * a.weight[c]);
  }
}

// One warp per (token, head slot); head slots are q heads, then k heads, then v heads. Each lane
// holds elements lane + 32 j of the head.
template <int kHd, DType kKv>
__global__ void __launch_bounds__(128) QkvPostKernel(QkvPostArgs a) {
  constexpr int kJ = kHd / kWarp;
  using KvE = Elem<kKv>;
  using KvT = typename KvE::Storage;
  const int lane = threadIdx.x % kWarp;
  const int64_t t = blockIdx.x;
  const int head_slot = blockIdx.y * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int nh = a.num_heads;
  const int nkv = a.num_kv_heads;
  if (head_slot >= nh + 2 * nkv) {
    return;  // whole warp; no block-level synchronisation below
  }
  const int64_t width = static_cast<int64_t>(nh + 2 * nkv) * kHd;
  const int64_t col0 = static_cast<int64_t>(head_slot) * kHd;
  float v[kJ];
#pragma unroll
  for (int j = 0; j < kJ; ++j) {
    const int64_t c = col0 + lane + kWarp * j;
    float x = LoadFolded(a.qkv, t * width + c);
    if (a.bias != nullptr) {
      x += a.bias[c];
    }
    v[j] = x;
  }
  const bool is_q = head_slot < nh;
  const bool is_k = !is_q && head_slot < nh + nkv;
  const float* norm = is_q ? a.q_norm : (is_k ? a.k_norm : nullptr);
  if (norm != nullptr) {
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      ss += v[j] * v[j];
    }
    ss = WarpSum(ss);
    const float scale = 1.0f / sqrtf(ss / static_cast<float>(kHd) + a.eps);
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      v[j] = v[j] * scale * norm[lane + kWarp * j];
    }
  }
  if (is_q || is_k) {
    // rotate_half: element i pairs with i + kHd/2.
    const float* cs = a.cos_sin + t * kHd;
    constexpr int kHalf = kHd / 2;
    if constexpr (kJ >= 2) {
#pragma unroll
      for (int j = 0; j < kJ / 2; ++j) {
        const int i = lane + kWarp * j;
        const float c = cs[i];
        const float s = cs[kHalf + i];
        const float x1 = v[j];
        const float x2 = v[j + kJ / 2];
        v[j] = x1 * c - x2 * s;
        v[j + kJ / 2] = x2 * c + x1 * s;
      }
    } else {  // kHd == 32: the partner of lane l is lane l ^ 16
      const float other = __shfl_xor_sync(kFullMask, v[0], kHalf, kWarp);
      const int i = lane % kHalf;
      const float c = cs[i];
      const float s = cs[kHalf + i];
      v[0] = lane < kHalf ? v[0] * c - other * s : v[0] * c + other * s;
    }
  }
  if (is_q) {
    float* q = a.q_out + t * static_cast<int64_t>(nh) * kHd + col0;
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      q[lane + kWarp * j] = v[j];
    }
    return;
  }
  const int64_t slot = a.slots[t];
  if (slot < 0) {
    return;
  }
  const int kvh = is_k ? head_slot - nh : head_slot - nh - nkv;
  KvT* cache = static_cast<KvT*>(is_k ? a.k_cache : a.v_cache);
  const int64_t base = (slot * nkv + kvh) * kHd;
#pragma unroll
  for (int j = 0; j < kJ; ++j) {
    KvE::Store(cache, base + lane + kWarp * j, v[j]);
  }
}

// ---- attention --------------------------------------------------------------------------------

constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * kWarp;
constexpr int kRowsPerWarp = kAttnTileRows / kAttnWarps;
constexpr int kKvTile = 32;  // keys per tile: one per lane in the score phase
static_assert(kRowsPerWarp * kAttnWarps == kAttnTileRows, "tile rows split evenly over warps");

// Flash-style: per KV tile, scores S = Q K^T (lane j owns key j), online softmax per row with
// warp reductions, then O += P V (lane owns head_dim elements lane + 32 i). K is padded by one
// float per row so that the lanes' column reads hit distinct banks.
template <int kHd, DType kKv>
__global__ void __launch_bounds__(kAttnThreads) AttentionKernel(AttentionArgs a) {
  constexpr int kJ = kHd / kWarp;
  using KvE = Elem<kKv>;
  using KvT = typename KvE::Storage;
  __shared__ float q_s[kAttnTileRows][kHd];
  __shared__ float k_s[kKvTile][kHd + 1];
  __shared__ float v_s[kKvTile][kHd];
  __shared__ int64_t off_s[kKvTile];

  const AttnTile tile = a.tiles[blockIdx.x];
  const AttnChunk ch = a.chunks[tile.chunk];
  const int kvh = blockIdx.y;
  const int split = blockIdx.z;
  const int group = a.num_heads / a.num_kv_heads;
  const int rows_total = ch.num_tokens * group;
  const int n_rows = min(kAttnTileRows, rows_total - tile.first_row);
  const int64_t q_stride = static_cast<int64_t>(a.num_heads) * kHd;

  for (int i = threadIdx.x; i < kAttnTileRows * kHd; i += blockDim.x) {
    const int r = i / kHd;
    const int d = i % kHd;
    float val = 0.0f;
    if (r < n_rows) {
      const int row = tile.first_row + r;
      const int64_t tok = ch.token_offset + row / group;
      val = a.q[tok * q_stride + static_cast<int64_t>(kvh * group + row % group) * kHd + d];
    }
    q_s[r][d] = val;
  }

  const int pos_first = ch.start_pos + tile.first_row / group;
  const int pos_last = ch.start_pos + (tile.first_row + n_rows - 1) / group;
  const int kv_lo = a.window > 0 ? max(0, pos_first - a.window + 1) : 0;
  const int kv_hi = pos_last + 1;
  const int n_kv_tiles = (kv_hi - kv_lo + kKvTile - 1) / kKvTile;
  const int per_split = (n_kv_tiles + a.num_splits - 1) / a.num_splits;
  const int kt_begin = split * per_split;
  const int kt_end = min(n_kv_tiles, kt_begin + per_split);

  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int row0 = warp * kRowsPerWarp;  // first tile row of this warp
  const bool warp_active = row0 < n_rows;
  int my_pos[kRowsPerWarp];
  int my_lo[kRowsPerWarp];
  bool valid[kRowsPerWarp];
  float m[kRowsPerWarp];
  float l[kRowsPerWarp];
  float o[kRowsPerWarp][kJ];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    valid[r] = row0 + r < n_rows;
    my_pos[r] = ch.start_pos + (tile.first_row + row0 + r) / group;
    my_lo[r] = a.window > 0 ? max(0, my_pos[r] - a.window + 1) : 0;
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      o[r][j] = 0.0f;
    }
  }
  const int32_t* table = a.block_tables + ch.table_offset;
  const KvT* kc = static_cast<const KvT*>(a.k_cache);
  const KvT* vc = static_cast<const KvT*>(a.v_cache);
  const int64_t token_stride = static_cast<int64_t>(a.num_kv_heads) * kHd;

  for (int kt = kt_begin; kt < kt_end; ++kt) {
    const int base = kv_lo + kt * kKvTile;
    __syncthreads();  // the previous tile (and on the first pass q_s) is settled
    if (threadIdx.x < kKvTile) {
      const int p = base + threadIdx.x;
      int64_t off = -1;
      if (p < kv_hi) {
        const int64_t block = table[p / a.block_size];
        off = (block * a.block_size + p % a.block_size) * token_stride +
              static_cast<int64_t>(kvh) * kHd;
      }
      off_s[threadIdx.x] = off;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kKvTile * kHd; i += blockDim.x) {
      const int j = i / kHd;
      const int d = i % kHd;
      const int64_t off = off_s[j];
      float kv = 0.0f;
      float vv = 0.0f;
      if (off >= 0) {
        kv = KvE::Load(kc, off + d);
        vv = KvE::Load(vc, off + d);
      }
      k_s[j][d] = kv;
      v_s[j][d] = vv;
    }
    __syncthreads();
    if (!warp_active) {
      continue;
    }
    float s[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      s[r] = 0.0f;
    }
#pragma unroll 8
    for (int d = 0; d < kHd; ++d) {
      const float kd = k_s[lane][d];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        s[r] += q_s[row0 + r][d] * kd;
      }
    }
    const int p = base + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const bool in = valid[r] && p <= my_pos[r] && p >= my_lo[r];
      const float sc = in ? s[r] * a.scale : -INFINITY;
      const float m_new = fmaxf(m[r], WarpMax(sc));
      if (m_new == -INFINITY) {  // warp-uniform: nothing visible to this row yet
        s[r] = 0.0f;
        continue;
      }
      const float corr = expf(m[r] - m_new);  // m == -inf gives 0
      const float pr = in ? expf(sc - m_new) : 0.0f;
      l[r] = l[r] * corr + WarpSum(pr);
#pragma unroll
      for (int j = 0; j < kJ; ++j) {
        o[r][j] *= corr;
      }
      m[r] = m_new;
      s[r] = pr;
    }
#pragma unroll 4
    for (int j = 0; j < kKvTile; ++j) {
      float pj[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        pj[r] = __shfl_sync(kFullMask, s[r], j, kWarp);
      }
#pragma unroll
      for (int i = 0; i < kJ; ++i) {
        const float vv = v_s[j][lane + kWarp * i];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          o[r][i] += pj[r] * vv;
        }
      }
    }
  }

  if (!warp_active) {
    return;
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    if (!valid[r]) {
      continue;
    }
    const int row = tile.first_row + row0 + r;
    const int64_t tok = ch.token_offset + row / group;
    const int head = kvh * group + row % group;
    if (a.num_splits == 1) {
      // The diagonal key is always visible, so l > 0.
      const float inv = 1.0f / l[r];
      float* out = a.out + tok * q_stride + static_cast<int64_t>(head) * kHd;
#pragma unroll
      for (int i = 0; i < kJ; ++i) {
        out[lane + kWarp * i] = o[r][i] * inv;
      }
    } else {
      const int64_t prow = (split * a.num_tokens + tok) * a.num_heads + head;
#pragma unroll
      for (int i = 0; i < kJ; ++i) {
        a.part_o[prow * kHd + lane + kWarp * i] = o[r][i];
      }
      if (lane == 0) {
        a.part_ml[prow * 2] = m[r];
        a.part_ml[prow * 2 + 1] = l[r];
      }
    }
  }
}

// One warp per (token, head): merges the splits' partials.
__global__ void AttentionCombineKernel(AttentionArgs a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) +
                      threadIdx.x / kWarp;
  const int64_t rows = a.num_tokens * a.num_heads;
  if (row >= rows) {
    return;
  }
  const int lane = threadIdx.x % kWarp;
  float mx = -INFINITY;
  for (int s = 0; s < a.num_splits; ++s) {
    mx = fmaxf(mx, a.part_ml[(s * rows + row) * 2]);
  }
  float total = 0.0f;
  for (int s = 0; s < a.num_splits; ++s) {
    const float ms = a.part_ml[(s * rows + row) * 2];
    if (ms != -INFINITY) {
      total += expf(ms - mx) * a.part_ml[(s * rows + row) * 2 + 1];
    }
  }
  const float inv = 1.0f / total;
  for (int d = lane; d < a.head_dim; d += kWarp) {
    float acc = 0.0f;
    for (int s = 0; s < a.num_splits; ++s) {
      const float ms = a.part_ml[(s * rows + row) * 2];
      if (ms != -INFINITY) {
        acc += expf(ms - mx) * a.part_o[(s * rows + row) * a.head_dim + d];
      }
    }
    a.out[row * a.head_dim + d] = acc * inv;
  }
}

__global__ void SiluMulKernel(FoldedIn gate_up, int64_t rows, int32_t inter, ActOut out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * inter) {
    return;
  }
  const int64_t r = i / inter;
  const int64_t c = i % inter;
  const float g = LoadFolded(gate_up, r * 2 * inter + c);
  const float u = LoadFolded(gate_up, r * 2 * inter + inter + c);
  StoreAct(out, i, g / (1.0f + expf(-g)) * u);
}

__global__ void ToActKernel(const float* in, int64_t n, ActOut out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    StoreAct(out, i, in[i]);
  }
}

__global__ void FoldKernel(float* y, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    y[i] += y[i + n];
  }
}

// One block per row: (max, first index) by a strided scan and a shared-memory reduction, then
// the sum of exp(x - max) the same way. The host reference sums in double; fp32 per thread and
// double across threads keeps the logprob within ~1e-6 of it.
constexpr int kPickThreads = 256;

__global__ void PickGreedyKernel(const float* logits, int64_t vocab, const int32_t* rows,
                                 DevicePick* out) {
  __shared__ float best_v[kPickThreads];
  __shared__ int64_t best_i[kPickThreads];
  __shared__ double sums[kPickThreads];
  const float* x = logits + static_cast<int64_t>(rows[blockIdx.x]) * vocab;
  const int tid = threadIdx.x;
  float bv = -INFINITY;
  int64_t bi = vocab;  // "none yet": loses every tie
  for (int64_t i = tid; i < vocab; i += kPickThreads) {
    const float v = x[i];
    if (v > bv) {  // false for NaN; ascending i keeps the first of equals
      bv = v;
      bi = i;
    }
  }
  best_v[tid] = bv;
  best_i[tid] = bi;
  __syncthreads();
  for (int stride = kPickThreads / 2; stride > 0; stride /= 2) {
    if (tid < stride) {
      const float ov = best_v[tid + stride];
      const int64_t oi = best_i[tid + stride];
      if (ov > best_v[tid] || (ov == best_v[tid] && oi < best_i[tid])) {
        best_v[tid] = ov;
        best_i[tid] = oi;
      }
    }
    __syncthreads();
  }
  const float max_v = best_v[0];
  const int64_t token = best_i[0] < vocab ? best_i[0] : 0;
  float partial = 0.0f;
  for (int64_t i = tid; i < vocab; i += kPickThreads) {
    partial += expf(x[i] - max_v);
  }
  sums[tid] = partial;
  __syncthreads();
  for (int stride = kPickThreads / 2; stride > 0; stride /= 2) {
    if (tid < stride) {
      sums[tid] += sums[tid + stride];
    }
    __syncthreads();
  }
  if (tid == 0) {
    out[blockIdx.x].token = static_cast<int32_t>(token);
    out[blockIdx.x].logprob = static_cast<float>(x[token] - max_v - log(sums[0]));
  }
}

// Grid-stride over num_tokens * token_elems for both K and V.
template <bool kToPaged>
__global__ void PagedCopyKernel(PagedCopyArgs a) {
  const int64_t total = a.num_tokens * a.token_elems;
  const int64_t first_block = a.first_token / a.block_size;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / a.token_elems;
    const int64_t e = i % a.token_elems;
    const int64_t pos = a.first_token + t;
    const int64_t block = a.table[pos / a.block_size - first_block];
    const int64_t paged = (block * a.block_size + pos % a.block_size) * a.token_elems + e;
    const int64_t src_i = kToPaged ? i : paged;
    const int64_t dst_i = kToPaged ? paged : i;
    StoreAny(a.dst_k, a.dst_type, dst_i, LoadAny(a.src_k, a.src_type, src_i));
    StoreAny(a.dst_v, a.dst_type, dst_i, LoadAny(a.src_v, a.src_type, src_i));
  }
}

unsigned Blocks(int64_t n, int threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

template <int kHd>
cudaError_t LaunchQkvPostHd(const QkvPostArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.num_tokens),
                  Blocks(a.num_heads + 2 * a.num_kv_heads, 4));
  switch (a.kv_dtype) {
    case DType::kF32:
      QkvPostKernel<kHd, DType::kF32><<<grid, 128, 0, stream>>>(a);
      break;
    case DType::kF16:
      QkvPostKernel<kHd, DType::kF16><<<grid, 128, 0, stream>>>(a);
      break;
    case DType::kBF16:
      QkvPostKernel<kHd, DType::kBF16><<<grid, 128, 0, stream>>>(a);
      break;
  }
  return cudaGetLastError();
}

template <int kHd>
cudaError_t LaunchAttentionHd(const AttentionArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.num_tiles), static_cast<unsigned>(a.num_kv_heads),
                  static_cast<unsigned>(a.num_splits));
  switch (a.kv_dtype) {
    case DType::kF32:
      AttentionKernel<kHd, DType::kF32><<<grid, kAttnThreads, 0, stream>>>(a);
      break;
    case DType::kF16:
      AttentionKernel<kHd, DType::kF16><<<grid, kAttnThreads, 0, stream>>>(a);
      break;
    case DType::kBF16:
      AttentionKernel<kHd, DType::kBF16><<<grid, kAttnThreads, 0, stream>>>(a);
      break;
  }
  return cudaGetLastError();
}

}  // namespace

bool SupportedHeadDim(int32_t head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 128;
}

cudaError_t LaunchEmbedding(const int32_t* ids, int64_t rows, const void* table, DType table_type,
                            int32_t hidden, float* x, cudaStream_t stream) {
  if (rows == 0) {
    return cudaSuccess;
  }
  EmbeddingKernel<<<static_cast<unsigned>(rows), 256, 0, stream>>>(ids, table, table_type, hidden,
                                                                   x);
  return cudaGetLastError();
}

cudaError_t LaunchRopeCosSin(const int32_t* positions, int64_t rows, const float* inv_freq,
                             int32_t half, float* cos_sin, cudaStream_t stream) {
  if (rows == 0) {
    return cudaSuccess;
  }
  RopeCosSinKernel<<<Blocks(rows * half, 256), 256, 0, stream>>>(positions, rows, inv_freq, half,
                                                                 cos_sin);
  return cudaGetLastError();
}

cudaError_t LaunchAddRmsNorm(const RmsNormArgs& args, cudaStream_t stream) {
  if (args.rows == 0) {
    return cudaSuccess;
  }
  AddRmsNormKernel<<<static_cast<unsigned>(args.rows), 256, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t LaunchQkvPost(const QkvPostArgs& args, cudaStream_t stream) {
  if (args.num_tokens == 0) {
    return cudaSuccess;
  }
  switch (args.head_dim) {
    case 32:
      return LaunchQkvPostHd<32>(args, stream);
    case 64:
      return LaunchQkvPostHd<64>(args, stream);
    case 128:
      return LaunchQkvPostHd<128>(args, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t LaunchAttention(const AttentionArgs& args, cudaStream_t stream) {
  if (args.num_tiles == 0) {
    return cudaSuccess;
  }
  if (args.num_splits < 1 || args.num_splits > kMaxAttnSplits) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaErrorInvalidValue;
  switch (args.head_dim) {
    case 32:
      err = LaunchAttentionHd<32>(args, stream);
      break;
    case 64:
      err = LaunchAttentionHd<64>(args, stream);
      break;
    case 128:
      err = LaunchAttentionHd<128>(args, stream);
      break;
    default:
      break;
  }
  if (err != cudaSuccess || args.num_splits == 1) {
    return err;
  }
  constexpr int kWarpsPerBlock = 4;
  AttentionCombineKernel<<<Blocks(args.num_tokens * args.num_heads, kWarpsPerBlock),
                           kWarpsPerBlock * kWarp, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t LaunchSiluMul(FoldedIn gate_up, int64_t rows, int32_t inter, ActOut out,
                          cudaStream_t stream) {
  if (rows == 0) {
    return cudaSuccess;
  }
  SiluMulKernel<<<Blocks(rows * inter, 256), 256, 0, stream>>>(gate_up, rows, inter, out);
  return cudaGetLastError();
}

cudaError_t LaunchToAct(const float* in, int64_t n, ActOut out, cudaStream_t stream) {
  if (n == 0) {
    return cudaSuccess;
  }
  ToActKernel<<<Blocks(n, 256), 256, 0, stream>>>(in, n, out);
  return cudaGetLastError();
}

cudaError_t LaunchFold(float* y, int64_t n, cudaStream_t stream) {
  if (n == 0) {
    return cudaSuccess;
  }
  FoldKernel<<<Blocks(n, 256), 256, 0, stream>>>(y, n);
  return cudaGetLastError();
}

cudaError_t LaunchPickGreedy(const float* logits, int64_t vocab, const int32_t* rows, int32_t n,
                             DevicePick* out, cudaStream_t stream) {
  if (n == 0) {
    return cudaSuccess;
  }
  PickGreedyKernel<<<n, kPickThreads, 0, stream>>>(logits, vocab, rows, out);
  return cudaGetLastError();
}

cudaError_t LaunchScatterTokens(const PagedCopyArgs& args, cudaStream_t stream) {
  const int64_t total = args.num_tokens * args.token_elems;
  if (total == 0) {
    return cudaSuccess;
  }
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(Blocks(total, 256), 4096));
  PagedCopyKernel<true><<<blocks, 256, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t LaunchGatherTokens(const PagedCopyArgs& args, cudaStream_t stream) {
  const int64_t total = args.num_tokens * args.token_elems;
  if (total == 0) {
    return cudaSuccess;
  }
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(Blocks(total, 256), 4096));
  PagedCopyKernel<false><<<blocks, 256, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace tandem::gpu
