// The compute-backend interface: one forward pass of the model over a batch of sequence chunks,
// reading and writing a paged KV store. Backends: cpu (here), cuda and hip (engine/backends/).
// Backend-specific types never appear above this interface.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/sampling.h"  // TokenPick
#include "kvcache/block_pool.h"
#include "kvcache/kv_store.h"

namespace tandem {

struct ModelWeights;

// Tokens of one sequence to run in this step. tokens[i] sits at position start_pos + i; the
// block table covers positions [0, start_pos + tokens.size()), and positions [0, start_pos)
// already hold KV.
struct SequenceChunk {
  std::span<const int32_t> tokens;
  int64_t start_pos = 0;
  std::span<const BlockId> block_table;
  bool want_logits = false;  // logits of the chunk's last token
  // With want_logits, on a backend whose ReturnsPicks(): return only the greedy token and its
  // logprob (PickGreedy in engine/sampling.h) in ForwardBatch::picks instead of the logits row.
  bool pick = false;
};

// Layer-wise KV export (the prefill side of disaggregation): tokens [first_token, first_token +
// count) of chunk `chunk`'s sequence, read through that chunk's block table. The range ends at or
// before the chunk's end and may start before the chunk (prefix-cache hits not yet sent).
struct KvExportRange {
  int32_t chunk = 0;
  int64_t first_token = 0;
  int64_t count = 0;  // >= 1
};

// One layer of one export range: K and V in canonical layout ([count][kv_heads][head_dim] in the
// KV store's dtype), readable for as long as keep_alive is held, whatever happens to the blocks.
struct ExportedKv {
  int32_t layer = 0;
  int32_t range = 0;  // index into ForwardBatch::exports
  const void* k = nullptr;
  const void* v = nullptr;
  std::shared_ptr<const void> keep_alive;
};
using KvExportCallback = std::function<void(ExportedKv)>;

struct ForwardBatch {
  std::span<const SequenceChunk> chunks;
  // One per chunk with want_logits && pick, in chunk order.
  std::span<TokenPick> picks;
  // With on_kv_export: called for every layer and range, on Forward's thread, in layer order, as
  // soon as the backend has the layer's K/V (a GPU backend copies them out on a second stream
  // while later layers compute), and always before Forward returns.
  std::span<const KvExportRange> exports;
  const KvExportCallback* on_kv_export = nullptr;
};

struct BackendOptions {
  int num_threads = 0;  // cpu: 0 = one per hardware thread
  // Largest step the engine will run (tokens, rows of logits): GPU backends allocate their
  // activation workspace for it up front, before sizing the KV pool (0: grow on demand).
  int32_t max_batch_tokens = 0;
  int32_t max_logit_rows = 0;
  // GPU backends: ignore the layout's num_blocks and give the KV store this fraction of the
  // device memory still free once the weights and the workspace are allocated, at most
  // max_kv_blocks blocks (0: no cap). The store's layout() reports the count chosen. 0: off.
  double kv_memory_fraction = 0;
  int32_t max_kv_blocks = 0;
  // GPU backends with bf16/f16 weights: true feeds GEMMs each activation as a hi + lo pair
  // (~fp32 results, twice the GEMM arithmetic); false rounds activations once to the weight
  // dtype (bf16 compute, as PyTorch runs such checkpoints: the fastest prefill).
  bool gpu_exact_activations = true;
  // GPU backends: replay plain greedy decode steps as device graphs (CUDA graphs).
  bool gpu_graphs = false;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string_view name() const = 0;
  virtual KvStore& kv_store() = 0;
  // Whether Forward honours SequenceChunk::pick (a GPU backend: the row stays on the device).
  virtual bool ReturnsPicks() const { return false; }
  // Runs the batch. `logits` receives vocab_size floats per chunk with want_logits (and not
  // pick, where ReturnsPicks()), in chunk order. Preconditions (checked by the engine): token ids in vocabulary, tables cover the
  // ranges, positions below the model's context length.
  virtual absl::Status Forward(const ForwardBatch& batch, std::span<float> logits) = 0;
};

// INVALID_ARGUMENT unless every export range names a chunk of the batch and lies within
// [0, that chunk's end), with count >= 1. Inline: GPU backend libraries use it without linking
// the engine.
inline absl::Status ValidateExports(const ForwardBatch& batch) {
  for (const KvExportRange& r : batch.exports) {
    if (r.chunk < 0 || static_cast<size_t>(r.chunk) >= batch.chunks.size()) {
      return absl::InvalidArgumentError("KV export range names no chunk of the batch");
    }
    const SequenceChunk& c = batch.chunks[r.chunk];
    const int64_t end = c.start_pos + static_cast<int64_t>(c.tokens.size());
    if (r.count < 1 || r.first_token < 0 || r.first_token > end - r.count) {
      return absl::InvalidArgumentError("KV export range outside its chunk's tokens");
    }
  }
  return absl::OkStatus();
}

// Delivers layer `layer` of every export range of `batch` by reading `store` into fresh
// canonical buffers (what a host-memory backend does after each layer).
absl::Status ExportLayerFromStore(const KvStore& store, int32_t layer, const ForwardBatch& batch);

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(const ModelWeights& model,
                                                          const KvStoreLayout& kv_layout,
                                                          const BackendOptions& options);

// "cpu", "cuda" or "hip"; UNIMPLEMENTED naming the backend when it was not built in.
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(std::string_view kind,
                                                       const ModelWeights& model,
                                                       const KvStoreLayout& kv_layout,
                                                       const BackendOptions& options);

}  // namespace tandem
