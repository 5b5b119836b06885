// The CUDA compute backend: weights resident in device memory, cuBLAS GEMMs (bf16/f16 operands,
// fp32 accumulation; fp32 weights stay fp32), own kernels for everything else, KV blocks in a
// DeviceKvStore. No CUDA type appears in this header.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"

namespace tandem {

struct ModelWeights;

enum class GpuActivationPrecision {
  // Activations enter bf16/f16 GEMMs as a hi + lo pair of the weight dtype (two row sets in one
  // GEMM, summed by the consumer): ~fp32-accurate results, twice the GEMM arithmetic but the
  // same weight traffic (decode stays bandwidth-bound). Matches the CPU backend to ~1e-5.
  kSplit,
  // Activations rounded once to the weight dtype: the fastest prefill, bf16-level agreement.
  kWeightDtype,
};

struct CudaBackendOptions {
  int device = 0;
  GpuActivationPrecision activation_precision = GpuActivationPrecision::kSplit;
  // Upper bound on the split-K factor of attention over long contexts (1 disables splitting).
  int32_t max_attention_splits = 16;
  // Replay decode steps as CUDA graphs, one per (batch size, attention splits): steps whose
  // chunks are single decode tokens, all reduced to greedy picks, with no KV export. Off by
  // default until verified on a device; a capture that fails turns graphs off for the backend.
  bool cuda_graphs = false;
  // Layer-wise KV export (ForwardBatch::exports). Device staging the K/V are gathered into
  // before their copy to pinned host memory (0: two K/V images of max_batch_tokens tokens, at
  // most 64 MiB; a larger layer goes in passes), and the most exported bytes enqueued but not
  // yet handed over before the host waits for the oldest layer (0: 256 MiB).
  int64_t export_staging_bytes = 0;
  int64_t export_pending_bytes = 0;
};

// `rope_inv_freq` is the model's RoPE frequency table (engine/internal/rope.h:
// RopeTable::Create(model.config).inv_freq()), passed in so this library does not link the
// engine. Errors: INVALID_ARGUMENT for a KV layout that does not fit the model, UNIMPLEMENTED for
// head sizes without kernels (supported: 32, 64, 128), RESOURCE_EXHAUSTED when device memory
// runs out, FAILED_PRECONDITION when no CUDA device is present, INTERNAL for other CUDA/cuBLAS
// failures.
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const ModelWeights& model,
                                                           const KvStoreLayout& kv_layout,
                                                           const BackendOptions& options,
                                                           std::vector<float> rope_inv_freq,
                                                           const CudaBackendOptions& cuda = {});

// What the CUDA-graph path of a backend made by CreateCudaBackend did (zeros for any other
// backend): graphs captured, steps replayed, and whether a capture failed (graphs then off).
struct CudaGraphStats {
  int64_t captured = 0;
  int64_t replayed = 0;
  bool failed = false;
};
CudaGraphStats GetCudaGraphStats(const Backend& backend);

// Free memory of a CUDA device in bytes (cudaMemGetInfo), for sizing the KV pool.
absl::StatusOr<int64_t> CudaFreeMemoryBytes(int device = 0);

// Number of CUDA devices; 0 (not an error) when the driver finds none.
int CudaDeviceCount();

}  // namespace tandem
