// Device kernels of the GPU backends and their host-side launchers. Written once against CUDA
// names; the HIP build includes engine/backends/hip/vendor_hip.h instead (TANDEM_USE_HIP).
//
// Every launcher enqueues work on `stream` and returns the launch status (cudaGetLastError);
// execution errors surface at the next synchronising call. This header is C++17 so that nvcc
// and hipcc can compile kernels.cu; it must not include engine headers that need C++20.
#pragma once

#include <cstdint>

#include "kvcache/dtype.h"

#if defined(TANDEM_USE_HIP)
#include "engine/backends/hip/vendor_hip.h"
#else
#include "engine/backends/cuda/vendor_cuda.h"
#endif

namespace tandem::gpu {

// Output of a GEMM, fp32, optionally with a second "lo" half to fold in: element i is
// data[i] + data[i + lo_offset] when lo_offset > 0 (see ActOut).
struct FoldedIn {
  const float* data = nullptr;
  int64_t lo_offset = 0;
};

// Input of a GEMM, written by the kernel that produces it: M rows of K elements of `dtype`.
// With lo_offset > 0 (bf16/f16 only) the value v is stored as hi = round(v) at i and
// lo = round(v - hi) at i + lo_offset (= M * K): the GEMM then runs over 2M rows and the consumer
// folds both halves, which carries ~16 (bf16) or ~22 (f16) mantissa bits of the activation into
// the tensor-core GEMM instead of 8 or 11.
struct ActOut {
  void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t lo_offset = 0;
};

// Head sizes the attention and QKV kernels are instantiated for.
bool SupportedHeadDim(int32_t head_dim);

// x[r][:] = embedding[ids[r]][:] as fp32.
cudaError_t LaunchEmbedding(const int32_t* ids, int64_t rows, const void* table, DType table_type,
                            int32_t hidden, float* x, cudaStream_t stream);

// cos_sin[r] = cos(inv_freq * pos[r]) (half values) then sin (half values), the angle as an fp32
// product and cos/sin evaluated in double, like engine/internal/rope.cc.
cudaError_t LaunchRopeCosSin(const int32_t* positions, int64_t rows, const float* inv_freq,
                             int32_t half, float* cos_sin, cudaStream_t stream);

// RMSNorm with the residual add fused in. For output row i, source row s = src_rows[i] (or i):
//   v = x[s] + delta[s] (delta optional);  if update_x: x[s] = v;
//   out[i] = v * 1/sqrt(mean(v^2) + eps) * weight
struct RmsNormArgs {
  float* x = nullptr;
  FoldedIn delta;
  const int32_t* src_rows = nullptr;
  bool update_x = true;
  const float* weight = nullptr;
  int64_t rows = 0;  // output rows
  int32_t n = 0;
  float eps = 1e-6f;
  ActOut out;
};
cudaError_t LaunchAddRmsNorm(const RmsNormArgs& args, cudaStream_t stream);

// After the fused q/k/v GEMM: fold, bias, optional per-head RMSNorm of q and k, RoPE of q and k,
// K and V written into the paged cache at slots[t] (a slot is block * block_size + offset;
// negative: not written), q written to q_out [T][num_heads * head_dim].
struct QkvPostArgs {
  FoldedIn qkv;  // [T][(num_heads + 2 * num_kv_heads) * head_dim]
  const float* bias = nullptr;
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  float eps = 1e-6f;
  const float* cos_sin = nullptr;  // [T][head_dim]
  const int64_t* slots = nullptr;  // [T]
  void* k_cache = nullptr;         // this layer: [num_blocks * block_size][num_kv_heads][head_dim]
  void* v_cache = nullptr;
  DType kv_dtype = DType::kF32;
  float* q_out = nullptr;
  int64_t num_tokens = 0;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
};
cudaError_t LaunchQkvPost(const QkvPostArgs& args, cudaStream_t stream);

// Paged attention over a batch of chunks, prefill and decode alike. Query rows of a chunk are
// (token, head-in-group) pairs, row = token * group + g, so the heads sharing a KV head share
// every K/V tile load. A tile is kAttnTileRows consecutive rows of one chunk.
constexpr int32_t kAttnTileRows = 16;
constexpr int32_t kMaxAttnSplits = 16;

struct AttnChunk {
  int32_t token_offset = 0;  // first row of this chunk in the batch's token rows
  int32_t num_tokens = 0;
  int32_t start_pos = 0;
  int32_t table_offset = 0;  // into block_tables
};
struct AttnTile {
  int32_t chunk = 0;
  int32_t first_row = 0;
};

struct AttentionArgs {
  const float* q = nullptr;  // [T][num_heads][head_dim]
  float* out = nullptr;      // [T][num_heads][head_dim]
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  DType kv_dtype = DType::kF32;
  const int32_t* block_tables = nullptr;
  const AttnChunk* chunks = nullptr;
  const AttnTile* tiles = nullptr;
  int32_t num_tiles = 0;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_size = 0;
  int32_t window = 0;  // sliding window in tokens, 0 = none
  float scale = 1.0f;
  // Split-K over the context (flash-decoding): each split covers a contiguous range of KV
  // tiles and writes unnormalised partials; a second kernel merges them into `out`.
  int32_t num_splits = 1;
  int64_t num_tokens = 0;
  float* part_o = nullptr;   // [num_splits][T * num_heads][head_dim]
  float* part_ml = nullptr;  // [num_splits][T * num_heads][2] (running max, sum)
};
cudaError_t LaunchAttention(const AttentionArgs& args, cudaStream_t stream);

// act[r][c] = silu(gate[r][c]) * up[r][c], gate_up = [T][2 * inter] (gate columns first).
cudaError_t LaunchSiluMul(FoldedIn gate_up, int64_t rows, int32_t inter, ActOut out,
                          cudaStream_t stream);

// out[i] = in[i] for i < n, converted to the GEMM input format.
cudaError_t LaunchToAct(const float* in, int64_t n, ActOut out, cudaStream_t stream);

// y[i] += y[i + n] for i < n.
cudaError_t LaunchFold(float* y, int64_t n, cudaStream_t stream);

// Greedy token and its log-softmax for rows rows[0..n) of logits[*][vocab]: the first index of
// the largest value (NaN never wins; 0 when nothing beats -inf), as engine/sampling.h PickGreedy.
// Layout-compatible with tandem::TokenPick.
struct DevicePick {
  int32_t token;
  float logprob;
};
cudaError_t LaunchPickGreedy(const float* logits, int64_t vocab, const int32_t* rows, int32_t n,
                             DevicePick* out, cudaStream_t stream);

// Token copies between canonical [n][token_elems] buffers and one layer of a paged store.
// `table` starts at the block holding first_token.
struct PagedCopyArgs {
  const void* src_k = nullptr;
  const void* src_v = nullptr;
  DType src_type = DType::kF32;
  void* dst_k = nullptr;
  void* dst_v = nullptr;
  DType dst_type = DType::kF32;
  const int32_t* table = nullptr;
  int64_t first_token = 0;
  int64_t num_tokens = 0;
  int32_t block_size = 0;
  int64_t token_elems = 0;
};
// canonical (src) -> paged (dst)
cudaError_t LaunchScatterTokens(const PagedCopyArgs& args, cudaStream_t stream);
// paged (src) -> canonical (dst)
cudaError_t LaunchGatherTokens(const PagedCopyArgs& args, cudaStream_t stream);

}  // namespace tandem::gpu
