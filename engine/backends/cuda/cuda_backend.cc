// CUDA backend: the CPU backend's forward pass (engine/backends/cpu/cpu_backend.cc) on the GPU.
// Residual stream and every non-GEMM op in fp32; GEMMs on cuBLAS with the weights in their
// stored dtype (bf16/f16 tensor cores or fp32) and fp32 accumulation; KV in a DeviceKvStore.
//
// One Forward enqueues everything on one stream: per-step metadata goes up in a single copy from
// pinned memory, logits come back at the end, and the call returns after the stream drained
// (so the KV it wrote is visible to any later KvStore call).
#include "engine/backends/cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cmath>
#include <cstring>
#include <deque>
#include <functional>
#include <initializer_list>
#include <map>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "engine/backends/cuda/cuda_util.h"
#include "engine/backends/cuda/device_kv_store.h"
#include "engine/backends/cuda/kernels.h"
#include "engine/model.h"
#include "engine/sampling.h"

namespace tandem {
namespace {

using cuda_internal::DeviceBuffer;
using cuda_internal::PinnedBuffer;

static_assert(sizeof(TokenPick) == sizeof(gpu::DevicePick) &&
                  offsetof(TokenPick, token) == offsetof(gpu::DevicePick, token) &&
                  offsetof(TokenPick, logprob) == offsetof(gpu::DevicePick, logprob),
              "device picks are copied into TokenPick as bytes");

cudaDataType_t CudaType(DType t) {
  switch (t) {
    case DType::kBF16:
      return CUDA_R_16BF;
    case DType::kF16:
      return CUDA_R_16F;
    case DType::kF32:
      break;
  }
  return CUDA_R_32F;
}

// A weight matrix [rows][cols] in device memory, row-major (the safetensors layout).
struct DeviceMatrix {
  DeviceBuffer buf;
  int64_t rows = 0;
  int64_t cols = 0;
  DType dtype = DType::kF32;
};

struct DeviceLayer {
  DeviceMatrix qkv;      // [wq; wk; wv]
  DeviceMatrix wo;
  DeviceMatrix gate_up;  // [w_gate; w_up]
  DeviceMatrix down;
  DeviceBuffer attn_norm;  // fp32 vectors
  DeviceBuffer mlp_norm;
  DeviceBuffer qkv_bias;  // [bq; bk; bv], empty without bias
  DeviceBuffer q_norm;    // empty without qk norm
  DeviceBuffer k_norm;
};

// Stacks `parts` (same column count) along rows in `dtype`, converting on the host where a part
// is stored in another dtype.
absl::Status UploadMatrix(std::initializer_list<const TensorView*> parts, DType dtype,
                          DeviceMatrix& out) {
  const TensorView* first = *parts.begin();
  if (first == nullptr || first->shape.size() != 2) {
    return absl::InvalidArgumentError("expected a 2-D weight matrix");
  }
  out.rows = 0;
  out.cols = first->shape[1];
  out.dtype = dtype;
  for (const TensorView* p : parts) {
    if (p == nullptr || p->shape.size() != 2 || p->shape[1] != out.cols) {
      return absl::InvalidArgumentError(
          absl::StrCat("weight ", p == nullptr ? first->name : p->name,
                       " does not stack with ", first->name));
    }
    out.rows += p->shape[0];
  }
  const size_t esize = DTypeSize(dtype);
  TANDEM_STATUS_RETURN_IF_ERROR(
      out.buf.Reserve(static_cast<size_t>(out.rows * out.cols) * esize, first->name.c_str()));
  std::vector<std::byte> converted;
  size_t offset = 0;
  for (const TensorView* p : parts) {
    const size_t n = static_cast<size_t>(p->numel());
    const void* src = p->data;
    if (p->dtype != dtype) {
      converted.resize(n * esize);
      ConvertElements(p->dtype, p->data, dtype, converted.data(), n);
      src = converted.data();
    }
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpy(out.buf.as<std::byte>() + offset, src, n * esize,
                                           cudaMemcpyHostToDevice));
    offset += n * esize;
  }
  return absl::OkStatus();
}

// Concatenates 1-D tensors into one fp32 device vector.
absl::Status UploadVectorF32(std::initializer_list<const TensorView*> parts, DeviceBuffer& out) {
  std::vector<float> host;
  for (const TensorView* p : parts) {
    const size_t at = host.size();
    host.resize(at + static_cast<size_t>(p->numel()));
    ToF32(p->dtype, p->data, host.data() + at, static_cast<size_t>(p->numel()));
  }
  TANDEM_STATUS_RETURN_IF_ERROR(out.Reserve(host.size() * sizeof(float), "norm/bias vector"));
  TANDEM_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(out.get(), host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
  return absl::OkStatus();
}

size_t AlignUp(size_t n, size_t a) { return (n + a - 1) / a * a; }

// Pinned host buffers for exported KV, recycled. A buffer handed to the KV data plane comes back
// when the last slice referencing it has been written (on the sender's thread, which only
// returns it); pinning and unpinning memory is slow and may synchronise the device, so both
// happen only in Take, on the backend's thread.
class PinnedPool : public std::enable_shared_from_this<PinnedPool> {
 public:
  explicit PinnedPool(size_t max_idle_bytes) : max_idle_bytes_(max_idle_bytes) {}

  // A buffer of at least `bytes` (the smallest idle one that fits, else a new one).
  absl::StatusOr<std::shared_ptr<PinnedBuffer>> Take(size_t bytes) {
    std::unique_ptr<PinnedBuffer> buf;
    std::vector<std::unique_ptr<PinnedBuffer>> surplus;
    {
      absl::MutexLock lock(&mu_);
      size_t best = idle_.size();
      for (size_t i = 0; i < idle_.size(); ++i) {
        if (idle_[i]->bytes() >= bytes &&
            (best == idle_.size() || idle_[i]->bytes() < idle_[best]->bytes())) {
          best = i;
        }
      }
      if (best < idle_.size()) {
        buf = std::move(idle_[best]);
        idle_.erase(idle_.begin() + static_cast<std::ptrdiff_t>(best));
        idle_bytes_ -= buf->bytes();
      }
      while (idle_bytes_ > max_idle_bytes_ && !idle_.empty()) {
        idle_bytes_ -= idle_.back()->bytes();
        surplus.push_back(std::move(idle_.back()));
        idle_.pop_back();
      }
    }
    surplus.clear();  // unpinned outside the lock
    if (buf == nullptr) {
      buf = std::make_unique<PinnedBuffer>();
      // MiB granularity, so that the layers of similar steps share buffers.
      TANDEM_STATUS_RETURN_IF_ERROR(buf->Reserve(AlignUp(bytes, size_t{1} << 20),
                                                 "exported KV (pinned host memory)"));
    }
    std::shared_ptr<PinnedPool> self = shared_from_this();
    return std::shared_ptr<PinnedBuffer>(buf.release(),
                                         [self](PinnedBuffer* b) { self->Give(b); });
  }

 private:
  void Give(PinnedBuffer* b) {
    absl::MutexLock lock(&mu_);
    idle_bytes_ += b->bytes();
    idle_.emplace_back(b);
  }

  const size_t max_idle_bytes_;
  absl::Mutex mu_;
  std::vector<std::unique_ptr<PinnedBuffer>> idle_ ABSL_GUARDED_BY(mu_);
  size_t idle_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(const ModelConfig& cfg, const KvStoreLayout& layout, const BackendOptions& common,
              const CudaBackendOptions& opts)
      : cfg_(cfg), layout_(layout), common_(common), opts_(opts) {}
  ~CudaBackend() override;

  absl::Status Init(const ModelWeights& model, const std::vector<float>& inv_freq);

  std::string_view name() const override { return "cuda"; }
  KvStore& kv_store() override { return *store_; }
  bool ReturnsPicks() const override { return true; }
  CudaGraphStats graph_stats() const { return graph_stats_; }
  absl::Status Forward(const ForwardBatch& batch, std::span<float> logits) override;

 private:
  // Plans the step on the host (ids, positions, KV slots, attention tiles, block tables) and
  // uploads it in one copy.
  absl::Status PrepareStep(const ForwardBatch& batch, int64_t T);
  absl::Status ReserveBuffers(int64_t T, int64_t n_logits);
  // Enqueues the step's kernels on stream_ (embedding .. picks), everything but the copies of
  // whole logits rows. `exporting`: the batch's KV exports run beside it (never in a graph).
  absl::Status EnqueueStep(int64_t T, int64_t n_logits, int64_t n_picks, int32_t num_splits,
                           const ForwardBatch* exporting);

  // Layer-wise KV export. After layer l's K/V are written, export_stream_ waits for them,
  // gathers every range into export_dev_ and copies the layer's image ([K V] per range, in range
  // order) into a pinned buffer, while stream_ goes on with the layer; the host hands finished
  // layers over in order and never waits for compute, only (when too much is pending, and at
  // the end of the step) for the copies.
  struct PendingExport {
    int32_t layer = 0;
    std::shared_ptr<PinnedBuffer> image;
  };
  struct ExportPlan {
    const ForwardBatch* batch = nullptr;
    std::vector<size_t> offsets;  // per range: its K in the layer image; V follows
    size_t token_bytes = 0;
    size_t layer_bytes = 0;
    std::deque<PendingExport> pending;
  };
  absl::Status PlanExports(const ForwardBatch& batch, ExportPlan& plan);
  absl::Status EnqueueLayerExport(int32_t layer, ExportPlan& plan);
  absl::Status DeliverOldestExport(ExportPlan& plan);
  // Replays (capturing first if needed) the step as a CUDA graph; *ran = false when graphs are
  // unavailable and the caller must enqueue the step itself.
  absl::Status RunAsGraph(int64_t T, int64_t n_logits, int64_t n_picks, int32_t num_splits,
                          bool* ran);
  // Device and pinned addresses a captured step bakes in.
  std::vector<const void*> GraphAddresses() const;

  // GEMM input for M rows against `w`.
  gpu::ActOut ActFor(const DeviceMatrix& w, int64_t M) const {
    const bool split = SplitFor(w);
    return gpu::ActOut{act_.get(), w.dtype, split ? M * w.cols : 0};
  }
  bool SplitFor(const DeviceMatrix& w) const {
    return opts_.activation_precision == GpuActivationPrecision::kSplit && w.dtype != DType::kF32;
  }
  // y[M][w.rows] (+ the lo half when split) = act[M][w.cols] . w^T
  absl::StatusOr<gpu::FoldedIn> Gemm(const DeviceMatrix& w, int64_t M, float* y);

  // Blocks for the KV store: the layout's count, or kv_memory_fraction of the memory left free.
  absl::StatusOr<int32_t> KvBlocks() const;

  const ModelConfig cfg_;
  KvStoreLayout layout_;  // num_blocks settled in Init
  const BackendOptions common_;
  const CudaBackendOptions opts_;
  int sm_count_ = 1;

  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  cudaEvent_t kv_ready_ = nullptr;
  std::unique_ptr<DeviceKvStore> store_;

  // KV export (see PendingExport).
  cudaStream_t export_stream_ = nullptr;
  std::vector<cudaEvent_t> export_done_;  // per layer: its image is in pinned memory
  DeviceBuffer export_dev_;
  std::shared_ptr<PinnedPool> export_pool_;

  DeviceMatrix embed_;
  DeviceMatrix lm_head_own_;
  const DeviceMatrix* lm_head_ = nullptr;  // &embed_ when tied and of the same dtype
  DeviceBuffer final_norm_;
  DeviceBuffer inv_freq_;
  std::vector<DeviceLayer> layers_;

  // Step plan (host, reused) and its device copy.
  std::vector<int32_t> ids_, pos_, logit_rows_, tables_;
  std::vector<int32_t> pick_rows_;  // rows of the logits buffer reduced to a pick on the device
  std::vector<int32_t> full_rows_;  // rows copied back whole
  std::vector<int64_t> slots_;
  std::vector<gpu::AttnChunk> chunks_;
  std::vector<gpu::AttnTile> tiles_;
  int32_t max_context_ = 0;
  PinnedBuffer meta_host_;
  DeviceBuffer meta_dev_;
  const int32_t* d_ids_ = nullptr;
  const int32_t* d_pos_ = nullptr;
  const int32_t* d_logit_rows_ = nullptr;
  const int32_t* d_tables_ = nullptr;
  const int64_t* d_slots_ = nullptr;
  const gpu::AttnChunk* d_chunks_ = nullptr;
  const gpu::AttnTile* d_tiles_ = nullptr;
  const int32_t* d_pick_rows_ = nullptr;
  DeviceBuffer picks_dev_;
  PinnedBuffer picks_host_;

  // Activations, grown on demand.
  DeviceBuffer x_, act_, y_, q_, attn_, cos_sin_, part_o_, part_ml_, logits_;

  // CUDA graphs of decode steps, by (tokens, attention splits). A graph is valid while every
  // buffer it touches stays at the address it was captured with.
  struct StepGraph {
    cudaGraphExec_t exec = nullptr;
    std::vector<const void*> addresses;
  };
  std::map<std::pair<int64_t, int32_t>, StepGraph> graphs_;
  CudaGraphStats graph_stats_;  // .failed: a capture failed, so steps no longer use graphs
  DeviceBuffer cublas_workspace_;  // fixed, so cuBLAS allocates nothing inside a capture
};

CudaBackend::~CudaBackend() {
  cudaSetDevice(opts_.device);
  if (stream_ != nullptr) {
    cudaStreamSynchronize(stream_);
  }
  for (auto& [key, g] : graphs_) {
    cudaGraphExecDestroy(g.exec);
  }
  if (cublas_ != nullptr) {
    cublasDestroy(cublas_);
  }
  if (kv_ready_ != nullptr) {
    cudaEventDestroy(kv_ready_);
  }
  if (export_stream_ != nullptr) {
    cudaStreamSynchronize(export_stream_);
    cudaStreamDestroy(export_stream_);
  }
  for (cudaEvent_t e : export_done_) {
    cudaEventDestroy(e);
  }
  if (stream_ != nullptr) {
    cudaStreamDestroy(stream_);
  }
}

absl::Status CudaBackend::Init(const ModelWeights& model, const std::vector<float>& inv_freq) {
  TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(opts_.device));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&kv_ready_, cudaEventDisableTiming));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&export_stream_, cudaStreamNonBlocking));
  export_done_.reserve(static_cast<size_t>(cfg_.num_layers));
  for (int32_t l = 0; l < cfg_.num_layers; ++l) {
    cudaEvent_t e = nullptr;
    TANDEM_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    export_done_.push_back(e);
  }
  export_pool_ = std::make_shared<PinnedPool>(size_t{512} << 20);
  TANDEM_CUBLAS_RETURN_IF_ERROR(cublasCreate(&cublas_));
  TANDEM_CUBLAS_RETURN_IF_ERROR(cublasSetStream(cublas_, stream_));
  // fp32 GEMMs stay fp32 (no TF32): f32 checkpoints are the exact-reference case.
  TANDEM_CUBLAS_RETURN_IF_ERROR(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));
  if (opts_.cuda_graphs) {
    constexpr size_t kWorkspace = size_t{32} << 20;
    TANDEM_STATUS_RETURN_IF_ERROR(cublas_workspace_.Reserve(kWorkspace, "cuBLAS workspace"));
    TANDEM_CUBLAS_RETURN_IF_ERROR(
        cublasSetWorkspace(cublas_, cublas_workspace_.get(), kWorkspace));
  }
  TANDEM_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, opts_.device));

  // GEMM weights keep the dtype of each layer's q_proj (bf16, f16 or f32); a tensor stored in
  // another dtype is converted to it. Norm weights and biases become fp32 vectors.
  const DType wtype = model.layers.at(0).wq->dtype;
  TANDEM_STATUS_RETURN_IF_ERROR(UploadMatrix({model.embed}, model.embed->dtype, embed_));
  if (model.lm_head == model.embed && model.embed->dtype == wtype) {
    lm_head_ = &embed_;
  } else {
    TANDEM_STATUS_RETURN_IF_ERROR(UploadMatrix({model.lm_head}, wtype, lm_head_own_));
    lm_head_ = &lm_head_own_;
  }
  TANDEM_STATUS_RETURN_IF_ERROR(UploadVectorF32({model.final_norm}, final_norm_));
  TANDEM_STATUS_RETURN_IF_ERROR(inv_freq_.Reserve(inv_freq.size() * sizeof(float), "inv_freq"));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpy(inv_freq_.get(), inv_freq.data(),
                                         inv_freq.size() * sizeof(float), cudaMemcpyHostToDevice));

  layers_.resize(model.layers.size());
  for (size_t l = 0; l < model.layers.size(); ++l) {
    const LayerWeights& L = model.layers[l];
    DeviceLayer& D = layers_[l];
    TANDEM_STATUS_RETURN_IF_ERROR(UploadMatrix({L.wq, L.wk, L.wv}, wtype, D.qkv));
    TANDEM_STATUS_RETURN_IF_ERROR(UploadMatrix({L.wo}, wtype, D.wo));
    TANDEM_STATUS_RETURN_IF_ERROR(UploadMatrix({L.w_gate, L.w_up}, wtype, D.gate_up));
    TANDEM_STATUS_RETURN_IF_ERROR(UploadMatrix({L.w_down}, wtype, D.down));
    TANDEM_STATUS_RETURN_IF_ERROR(UploadVectorF32({L.attn_norm}, D.attn_norm));
    TANDEM_STATUS_RETURN_IF_ERROR(UploadVectorF32({L.mlp_norm}, D.mlp_norm));
    if (L.bq != nullptr || L.bk != nullptr || L.bv != nullptr) {
      if (L.bq == nullptr || L.bk == nullptr || L.bv == nullptr) {
        return absl::UnimplementedError("attention bias on only some of q/k/v");
      }
      TANDEM_STATUS_RETURN_IF_ERROR(UploadVectorF32({L.bq, L.bk, L.bv}, D.qkv_bias));
    }
    if (L.q_norm != nullptr) {
      TANDEM_STATUS_RETURN_IF_ERROR(UploadVectorF32({L.q_norm}, D.q_norm));
      TANDEM_STATUS_RETURN_IF_ERROR(UploadVectorF32({L.k_norm}, D.k_norm));
    }
  }
  // A pageable-memory cudaMemcpy may return before its DMA lands, and stream_ does not order
  // after the legacy stream.
  TANDEM_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());

  // The workspace for the largest step first, so that the KV pool cannot take the memory a
  // full step needs later; then the KV store.
  if (common_.max_batch_tokens > 0) {
    TANDEM_STATUS_RETURN_IF_ERROR(ReserveBuffers(common_.max_batch_tokens,
                                                 std::max<int64_t>(1, common_.max_logit_rows)));
    const size_t token_bytes =
        static_cast<size_t>(layout_.geometry.token_elems()) * DTypeSize(layout_.dtype);
    size_t staging = opts_.export_staging_bytes > 0
                         ? static_cast<size_t>(opts_.export_staging_bytes)
                         : std::min(2 * static_cast<size_t>(common_.max_batch_tokens) * token_bytes,
                                    size_t{64} << 20);
    TANDEM_STATUS_RETURN_IF_ERROR(
        export_dev_.Reserve(std::max(staging, 2 * token_bytes), "KV export staging"));
  }
  absl::StatusOr<int32_t> blocks = KvBlocks();
  if (!blocks.ok()) {
    return blocks.status();
  }
  layout_.num_blocks = *blocks;
  auto store = DeviceKvStore::Create(layout_, opts_.device);
  if (!store.ok()) {
    return store.status();
  }
  store_ = std::move(*store);
  return absl::OkStatus();
}

absl::StatusOr<int32_t> CudaBackend::KvBlocks() const {
  if (common_.kv_memory_fraction == 0) {
    return layout_.num_blocks;
  }
  const absl::StatusOr<int64_t> free_bytes = CudaFreeMemoryBytes(opts_.device);
  if (!free_bytes.ok()) {
    return free_bytes.status();
  }
  // K and V of every layer for one block.
  const double per_block = 2.0 * layout_.geometry.num_layers * layout_.block_size *
                           static_cast<double>(layout_.geometry.token_elems()) *
                           static_cast<double>(DTypeSize(layout_.dtype));
  int64_t blocks =
      static_cast<int64_t>(common_.kv_memory_fraction * static_cast<double>(*free_bytes) / per_block);
  if (common_.max_kv_blocks > 0) {
    blocks = std::min<int64_t>(blocks, common_.max_kv_blocks);
  }
  blocks = std::min<int64_t>(blocks, int64_t{1} << 30);
  if (blocks <= 0) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "kv_memory_fraction ", common_.kv_memory_fraction, " of the ", *free_bytes >> 20,
        " MiB free on cuda device ", opts_.device, " after loading the weights is less than one ",
        static_cast<int64_t>(per_block) >> 10, " KiB KV block"));
  }
  return static_cast<int32_t>(blocks);
}

absl::StatusOr<gpu::FoldedIn> CudaBackend::Gemm(const DeviceMatrix& w, int64_t M, float* y) {
  const bool split = SplitFor(w);
  const int64_t rows = split ? 2 * M : M;
  const float one = 1.0f;
  const float zero = 0.0f;
  const cudaDataType_t t = CudaType(w.dtype);
  // Row-major y[rows][N] = act[rows][K] . w[N][K]^T is column-major y^T = w^T(op T) . act^T.
  TANDEM_CUBLAS_RETURN_IF_ERROR(cublasGemmEx(
      cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(w.rows), static_cast<int>(rows),
      static_cast<int>(w.cols), &one, w.buf.get(), t, static_cast<int>(w.cols), act_.get(), t,
      static_cast<int>(w.cols), &zero, y, CUDA_R_32F, static_cast<int>(w.rows),
      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return gpu::FoldedIn{y, split ? M * w.rows : 0};
}

absl::Status CudaBackend::PrepareStep(const ForwardBatch& batch, int64_t T) {
  const int32_t bs = layout_.block_size;
  const int32_t group = cfg_.num_heads / cfg_.num_kv_heads;
  ids_.clear();
  pos_.clear();
  slots_.clear();
  logit_rows_.clear();
  pick_rows_.clear();
  full_rows_.clear();
  tables_.clear();
  chunks_.clear();
  tiles_.clear();
  max_context_ = 0;
  int32_t row = 0;
  for (size_t ci = 0; ci < batch.chunks.size(); ++ci) {
    const SequenceChunk& c = batch.chunks[ci];
    const int32_t n = static_cast<int32_t>(c.tokens.size());
    const int32_t start = static_cast<int32_t>(c.start_pos);
    const int32_t end = start + n;
    const int32_t table_offset = static_cast<int32_t>(tables_.size());
    const int64_t blocks = (static_cast<int64_t>(end) + bs - 1) / bs;
    tables_.insert(tables_.end(), c.block_table.begin(), c.block_table.begin() + blocks);
    chunks_.push_back(gpu::AttnChunk{row, n, start, table_offset});
    for (int32_t i = 0; i < n; ++i) {
      const int32_t p = start + i;
      ids_.push_back(c.tokens[i]);
      pos_.push_back(p);
      slots_.push_back(static_cast<int64_t>(c.block_table[p / bs]) * bs + p % bs);
    }
    for (int32_t r = 0; r < n * group; r += gpu::kAttnTileRows) {
      tiles_.push_back(gpu::AttnTile{static_cast<int32_t>(ci), r});
    }
    if (c.want_logits && n > 0) {
      const int32_t logits_row = static_cast<int32_t>(logit_rows_.size());
      (c.pick ? pick_rows_ : full_rows_).push_back(logits_row);
      logit_rows_.push_back(row + n - 1);
    }
    max_context_ = std::max(max_context_, end);
    row += n;
  }

  // One pinned image: sections aligned to 16 bytes.
  size_t off = 0;
  auto section = [&off](size_t bytes) {
    const size_t at = off;
    off = AlignUp(off + bytes, 16);
    return at;
  };
  const size_t o_ids = section(ids_.size() * sizeof(int32_t));
  const size_t o_pos = section(pos_.size() * sizeof(int32_t));
  const size_t o_rows = section(logit_rows_.size() * sizeof(int32_t));
  const size_t o_slots = section(slots_.size() * sizeof(int64_t));
  const size_t o_chunks = section(chunks_.size() * sizeof(gpu::AttnChunk));
  const size_t o_tiles = section(tiles_.size() * sizeof(gpu::AttnTile));
  const size_t o_picks = section(pick_rows_.size() * sizeof(int32_t));
  // Block tables last: they grow with the contexts, and every other section then keeps its
  // offset from step to step of the same batch (what a replayed CUDA graph needs).
  const size_t o_tables = section(tables_.size() * sizeof(int32_t));
  const size_t meta_bytes = std::max(off, size_t{1} << 20);
  TANDEM_STATUS_RETURN_IF_ERROR(meta_host_.Reserve(meta_bytes, "step metadata (host)"));
  TANDEM_STATUS_RETURN_IF_ERROR(meta_dev_.Reserve(meta_bytes, "step metadata (device)"));
  std::byte* h = meta_host_.bytes_ptr();
  auto put = [h](size_t at, const auto& v) {
    if (!v.empty()) {
      std::memcpy(h + at, v.data(), v.size() * sizeof(v[0]));
    }
  };
  put(o_ids, ids_);
  put(o_pos, pos_);
  put(o_rows, logit_rows_);
  put(o_tables, tables_);
  put(o_slots, slots_);
  put(o_chunks, chunks_);
  put(o_tiles, tiles_);
  put(o_picks, pick_rows_);
  // The previous step's copy finished: Forward drains the stream before returning.
  TANDEM_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(meta_dev_.get(), h, off, cudaMemcpyHostToDevice, stream_));
  std::byte* d = meta_dev_.as<std::byte>();
  d_ids_ = reinterpret_cast<const int32_t*>(d + o_ids);
  d_pos_ = reinterpret_cast<const int32_t*>(d + o_pos);
  d_logit_rows_ = reinterpret_cast<const int32_t*>(d + o_rows);
  d_tables_ = reinterpret_cast<const int32_t*>(d + o_tables);
  d_slots_ = reinterpret_cast<const int64_t*>(d + o_slots);
  d_chunks_ = reinterpret_cast<const gpu::AttnChunk*>(d + o_chunks);
  d_tiles_ = reinterpret_cast<const gpu::AttnTile*>(d + o_tiles);
  d_pick_rows_ = reinterpret_cast<const int32_t*>(d + o_picks);
  (void)T;
  return absl::OkStatus();
}

absl::Status CudaBackend::ReserveBuffers(int64_t T, int64_t n_logits) {
  const int64_t H = cfg_.hidden_size;
  const int64_t q_dim = static_cast<int64_t>(cfg_.num_heads) * cfg_.head_dim;
  const int64_t n_qkv = q_dim + 2 * static_cast<int64_t>(cfg_.num_kv_heads) * cfg_.head_dim;
  const int64_t I = cfg_.intermediate_size;
  const int64_t V = cfg_.vocab_size;
  const size_t f = sizeof(float);
  // Worst case over GEMM operands: 2 row sets (split) of up to 4-byte elements.
  const size_t rows2 = 2 * static_cast<size_t>(T);
  TANDEM_STATUS_RETURN_IF_ERROR(x_.Reserve(T * H * f, "residual"));
  TANDEM_STATUS_RETURN_IF_ERROR(act_.Reserve(rows2 * std::max({H, q_dim, I}) * f, "gemm input"));
  TANDEM_STATUS_RETURN_IF_ERROR(
      y_.Reserve(rows2 * std::max({n_qkv, H, 2 * I}) * f, "gemm output"));
  TANDEM_STATUS_RETURN_IF_ERROR(q_.Reserve(T * q_dim * f, "q"));
  TANDEM_STATUS_RETURN_IF_ERROR(attn_.Reserve(T * q_dim * f, "attention output"));
  TANDEM_STATUS_RETURN_IF_ERROR(cos_sin_.Reserve(T * cfg_.head_dim * f, "rope"));
  if (n_logits > 0) {
    TANDEM_STATUS_RETURN_IF_ERROR(
        logits_.Reserve(2 * static_cast<size_t>(n_logits) * V * f, "logits"));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Forward(const ForwardBatch& batch, std::span<float> logits) {
  const int32_t hd = cfg_.head_dim;
  const int32_t nh = cfg_.num_heads;
  const int32_t nkv = cfg_.num_kv_heads;
  const int64_t V = cfg_.vocab_size;

  int64_t T = 0;
  int64_t n_logits = 0;
  int64_t n_picks = 0;
  for (const SequenceChunk& c : batch.chunks) {
    const int64_t n = static_cast<int64_t>(c.tokens.size());
    TANDEM_STATUS_RETURN_IF_ERROR(ValidateTokenRange(layout_, 0, c.block_table, c.start_pos, n));
    if (c.start_pos + n > INT32_MAX) {
      return absl::InvalidArgumentError("sequence position beyond 2^31");
    }
    for (const int32_t id : c.tokens) {
      if (id < 0 || id >= V) {
        return absl::InvalidArgumentError(absl::StrCat("token id ", id, " out of vocabulary"));
      }
    }
    T += n;
    n_logits += (c.want_logits && n > 0) ? 1 : 0;
    n_picks += (c.want_logits && c.pick && n > 0) ? 1 : 0;
  }
  if (static_cast<int64_t>(logits.size()) < (n_logits - n_picks) * V ||
      static_cast<int64_t>(batch.picks.size()) < n_picks) {
    return absl::InvalidArgumentError("logits or picks buffer too small");
  }
  TANDEM_STATUS_RETURN_IF_ERROR(ValidateExports(batch));
  if (T == 0) {
    return absl::OkStatus();
  }
  if (T > INT32_MAX / 2) {
    return absl::InvalidArgumentError("too many tokens in one step");
  }
  TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(opts_.device));
  TANDEM_STATUS_RETURN_IF_ERROR(ReserveBuffers(T, n_logits));
  TANDEM_STATUS_RETURN_IF_ERROR(PrepareStep(batch, T));

  // Split-K over the context when the (tile, kv head) grid cannot fill the GPU, keeping at
  // least four 32-key tiles per split.
  int32_t num_splits = 1;
  {
    const int64_t base_blocks = static_cast<int64_t>(tiles_.size()) * nkv;
    const int64_t kv_tiles = (max_context_ + 31) / 32;
    const int64_t target = 2 * static_cast<int64_t>(sm_count_);
    const int32_t cap = std::min(opts_.max_attention_splits, gpu::kMaxAttnSplits);
    if (cap > 1 && base_blocks < target && kv_tiles >= 8) {
      const int64_t want = (target + base_blocks - 1) / base_blocks;
      num_splits = static_cast<int32_t>(std::clamp<int64_t>(std::min(want, kv_tiles / 4), 1, cap));
    }
    if (num_splits > 1) {
      const size_t rows = static_cast<size_t>(num_splits) * T * nh;
      TANDEM_STATUS_RETURN_IF_ERROR(part_o_.Reserve(rows * hd * sizeof(float), "attn partials"));
      TANDEM_STATUS_RETURN_IF_ERROR(part_ml_.Reserve(rows * 2 * sizeof(float), "attn partials"));
    }
  }

  if (n_picks > 0) {
    const size_t bytes = static_cast<size_t>(n_picks) * sizeof(gpu::DevicePick);
    TANDEM_STATUS_RETURN_IF_ERROR(picks_dev_.Reserve(bytes, "picks (device)"));
    TANDEM_STATUS_RETURN_IF_ERROR(picks_host_.Reserve(bytes, "picks (host)"));
  }

  // A step of decodes whose rows are all picks can be a CUDA graph (no host work between
  // kernels, nothing copied to pageable memory); anything else is enqueued kernel by kernel.
  const bool exporting =
      !batch.exports.empty() && batch.on_kv_export != nullptr && *batch.on_kv_export;
  const bool graphable = opts_.cuda_graphs && !graph_stats_.failed && !exporting &&
                         T == static_cast<int64_t>(batch.chunks.size()) && n_logits == T &&
                         n_picks == T;
  bool ran = false;
  if (graphable) {
    TANDEM_STATUS_RETURN_IF_ERROR(RunAsGraph(T, n_logits, n_picks, num_splits, &ran));
  }
  if (!ran) {
    TANDEM_STATUS_RETURN_IF_ERROR(
        EnqueueStep(T, n_logits, n_picks, num_splits, exporting ? &batch : nullptr));
  }
  const float* d_logits = logits_.as<float>();
  for (size_t i = 0; i < full_rows_.size();) {
    size_t run = 1;
    while (i + run < full_rows_.size() &&
           full_rows_[i + run] == full_rows_[i] + static_cast<int32_t>(run)) {
      ++run;
    }
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
        logits.data() + static_cast<int64_t>(i) * V,
        d_logits + static_cast<int64_t>(full_rows_[i]) * V, run * V * sizeof(float),
        cudaMemcpyDeviceToHost, stream_));
    i += run;
  }
  TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  if (n_picks > 0) {
    std::memcpy(batch.picks.data(), picks_host_.bytes_ptr(),
                static_cast<size_t>(n_picks) * sizeof(TokenPick));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::EnqueueStep(int64_t T, int64_t n_logits, int64_t n_picks,
                                      int32_t num_splits, const ForwardBatch* exporting) {
  const int64_t H = cfg_.hidden_size;
  const int32_t hd = cfg_.head_dim;
  const int32_t nh = cfg_.num_heads;
  const int32_t nkv = cfg_.num_kv_heads;
  const int64_t q_dim = static_cast<int64_t>(nh) * hd;
  const int64_t I = cfg_.intermediate_size;
  const int64_t V = cfg_.vocab_size;
  const float eps = cfg_.rms_norm_eps;
  float* x = x_.as<float>();
  float* y = y_.as<float>();
  TANDEM_CUDA_RETURN_IF_ERROR(
      gpu::LaunchEmbedding(d_ids_, T, embed_.buf.get(), embed_.dtype, static_cast<int32_t>(H), x,
                           stream_));
  TANDEM_CUDA_RETURN_IF_ERROR(gpu::LaunchRopeCosSin(d_pos_, T, inv_freq_.as<float>(), hd / 2,
                                                    cos_sin_.as<float>(), stream_));

  ExportPlan plan;
  // On every return: no copy may still be landing in a pinned buffer that goes back to the pool.
  struct DrainExports {
    cudaStream_t stream;
    const ExportPlan& plan;
    ~DrainExports() {
      if (!plan.pending.empty()) {
        cudaStreamSynchronize(stream);
      }
    }
  } drain{export_stream_, plan};
  if (exporting != nullptr) {
    TANDEM_STATUS_RETURN_IF_ERROR(PlanExports(*exporting, plan));
  }
  gpu::FoldedIn delta;  // the previous layer's MLP output, added into x by the next norm
  for (int32_t l = 0; l < cfg_.num_layers; ++l) {
    const DeviceLayer& D = layers_[l];
    gpu::RmsNormArgs norm;
    norm.x = x;
    norm.delta = delta;
    norm.weight = D.attn_norm.as<float>();
    norm.rows = T;
    norm.n = static_cast<int32_t>(H);
    norm.eps = eps;
    norm.out = ActFor(D.qkv, T);
    TANDEM_CUDA_RETURN_IF_ERROR(gpu::LaunchAddRmsNorm(norm, stream_));
    absl::StatusOr<gpu::FoldedIn> qkv = Gemm(D.qkv, T, y);
    if (!qkv.ok()) {
      return qkv.status();
    }

    gpu::QkvPostArgs post;
    post.qkv = *qkv;
    post.bias = D.qkv_bias.as<float>();
    post.q_norm = D.q_norm.as<float>();
    post.k_norm = D.k_norm.as<float>();
    post.eps = eps;
    post.cos_sin = cos_sin_.as<float>();
    post.slots = d_slots_;
    post.k_cache = store_->KLayer(l);
    post.v_cache = store_->VLayer(l);
    post.kv_dtype = layout_.dtype;
    post.q_out = q_.as<float>();
    post.num_tokens = T;
    post.num_heads = nh;
    post.num_kv_heads = nkv;
    post.head_dim = hd;
    TANDEM_CUDA_RETURN_IF_ERROR(gpu::LaunchQkvPost(post, stream_));
    if (plan.batch != nullptr) {
      TANDEM_STATUS_RETURN_IF_ERROR(EnqueueLayerExport(l, plan));
    }

    gpu::AttentionArgs att;
    att.q = q_.as<float>();
    att.out = attn_.as<float>();
    att.k_cache = store_->KLayer(l);
    att.v_cache = store_->VLayer(l);
    att.kv_dtype = layout_.dtype;
    att.block_tables = d_tables_;
    att.chunks = d_chunks_;
    att.tiles = d_tiles_;
    att.num_tiles = static_cast<int32_t>(tiles_.size());
    att.num_heads = nh;
    att.num_kv_heads = nkv;
    att.head_dim = hd;
    att.block_size = layout_.block_size;
    att.window = static_cast<int32_t>(
        std::min<int64_t>(cfg_.sliding_window.value_or(0), INT32_MAX));
    att.scale = 1.0f / std::sqrt(static_cast<float>(hd));
    att.num_splits = num_splits;
    att.num_tokens = T;
    att.part_o = part_o_.as<float>();
    att.part_ml = part_ml_.as<float>();
    TANDEM_CUDA_RETURN_IF_ERROR(gpu::LaunchAttention(att, stream_));

    TANDEM_CUDA_RETURN_IF_ERROR(
        gpu::LaunchToAct(attn_.as<float>(), T * q_dim, ActFor(D.wo, T), stream_));
    absl::StatusOr<gpu::FoldedIn> o = Gemm(D.wo, T, y);
    if (!o.ok()) {
      return o.status();
    }
    norm.delta = *o;
    norm.weight = D.mlp_norm.as<float>();
    norm.out = ActFor(D.gate_up, T);
    TANDEM_CUDA_RETURN_IF_ERROR(gpu::LaunchAddRmsNorm(norm, stream_));
    absl::StatusOr<gpu::FoldedIn> gate_up = Gemm(D.gate_up, T, y);
    if (!gate_up.ok()) {
      return gate_up.status();
    }
    TANDEM_CUDA_RETURN_IF_ERROR(gpu::LaunchSiluMul(*gate_up, T, static_cast<int32_t>(I),
                                                   ActFor(D.down, T), stream_));
    absl::StatusOr<gpu::FoldedIn> down = Gemm(D.down, T, y);
    if (!down.ok()) {
      return down.status();
    }
    delta = *down;
  }

  if (n_logits > 0) {
    gpu::RmsNormArgs norm;
    norm.x = x;
    norm.delta = delta;
    norm.src_rows = d_logit_rows_;
    norm.update_x = false;
    norm.weight = final_norm_.as<float>();
    norm.rows = n_logits;
    norm.n = static_cast<int32_t>(H);
    norm.eps = eps;
    norm.out = ActFor(*lm_head_, n_logits);
    TANDEM_CUDA_RETURN_IF_ERROR(gpu::LaunchAddRmsNorm(norm, stream_));
    float* d_logits = logits_.as<float>();
    absl::StatusOr<gpu::FoldedIn> out = Gemm(*lm_head_, n_logits, d_logits);
    if (!out.ok()) {
      return out.status();
    }
    if (out->lo_offset > 0) {
      TANDEM_CUDA_RETURN_IF_ERROR(gpu::LaunchFold(d_logits, n_logits * V, stream_));
    }
    // Greedy rows come back as 8-byte picks (the others are copied by the caller).
    if (n_picks > 0) {
      const size_t bytes = static_cast<size_t>(n_picks) * sizeof(gpu::DevicePick);
      TANDEM_CUDA_RETURN_IF_ERROR(gpu::LaunchPickGreedy(d_logits, V, d_pick_rows_,
                                                        static_cast<int32_t>(n_picks),
                                                        picks_dev_.as<gpu::DevicePick>(), stream_));
      TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(picks_host_.bytes_ptr(), picks_dev_.get(), bytes,
                                                  cudaMemcpyDeviceToHost, stream_));
    }
  }
  // Everything is enqueued: hand the layers over as their copies land, while the device runs.
  while (!plan.pending.empty()) {
    TANDEM_STATUS_RETURN_IF_ERROR(DeliverOldestExport(plan));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::PlanExports(const ForwardBatch& batch, ExportPlan& plan) {
  plan.batch = &batch;
  plan.token_bytes =
      static_cast<size_t>(layout_.geometry.token_elems()) * DTypeSize(layout_.dtype);
  plan.offsets.clear();
  size_t off = 0;
  for (const KvExportRange& r : batch.exports) {
    plan.offsets.push_back(off);
    off += 2 * static_cast<size_t>(r.count) * plan.token_bytes;
  }
  plan.layer_bytes = off;
  if (common_.max_batch_tokens > 0 && export_dev_.bytes() > 0) {
    return absl::OkStatus();  // reserved with the workspace in Init, before the KV pool
  }
  // No workspace reserved up front: grow to a layer's image, at most 64 MiB (more in passes).
  const size_t want = opts_.export_staging_bytes > 0
                          ? static_cast<size_t>(opts_.export_staging_bytes)
                          : std::min(plan.layer_bytes, size_t{64} << 20);
  return export_dev_.Reserve(std::max(want, 2 * plan.token_bytes), "KV export staging");
}

absl::Status CudaBackend::EnqueueLayerExport(int32_t layer, ExportPlan& plan) {
  const size_t max_pending = opts_.export_pending_bytes > 0
                                 ? static_cast<size_t>(opts_.export_pending_bytes)
                                 : size_t{256} << 20;
  while (!plan.pending.empty() &&
         (plan.pending.size() + 1) * plan.layer_bytes > std::max(max_pending, plan.layer_bytes)) {
    TANDEM_STATUS_RETURN_IF_ERROR(DeliverOldestExport(plan));
  }
  absl::StatusOr<std::shared_ptr<PinnedBuffer>> image = export_pool_->Take(plan.layer_bytes);
  if (!image.ok()) {
    return image.status();
  }
  TANDEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(kv_ready_, stream_));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(export_stream_, kv_ready_, 0));
  plan.pending.push_back(PendingExport{layer, *std::move(image)});
  std::byte* host = plan.pending.back().image->bytes_ptr();
  std::byte* dev = export_dev_.as<std::byte>();
  const size_t tb = plan.token_bytes;
  const int32_t bs = layout_.block_size;
  auto gather = [&](const KvExportRange& r, int64_t first, int64_t count, std::byte* k,
                    std::byte* v) {
    gpu::PagedCopyArgs args;
    args.src_k = store_->KLayer(layer);
    args.src_v = store_->VLayer(layer);
    args.src_type = layout_.dtype;
    args.dst_k = k;
    args.dst_v = v;
    args.dst_type = layout_.dtype;
    args.table = d_tables_ + chunks_[r.chunk].table_offset + first / bs;
    args.first_token = first;
    args.num_tokens = count;
    args.block_size = bs;
    args.token_elems = layout_.geometry.token_elems();
    return gpu::LaunchGatherTokens(args, export_stream_);
  };
  const std::span<const KvExportRange> ranges = plan.batch->exports;
  if (plan.layer_bytes <= export_dev_.bytes()) {
    // The whole layer image on the device, then one copy.
    for (size_t i = 0; i < ranges.size(); ++i) {
      std::byte* k = dev + plan.offsets[i];
      TANDEM_CUDA_RETURN_IF_ERROR(gather(ranges[i], ranges[i].first_token, ranges[i].count, k,
                                         k + static_cast<size_t>(ranges[i].count) * tb));
    }
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host, dev, plan.layer_bytes,
                                                cudaMemcpyDeviceToHost, export_stream_));
  } else {
    // In passes of as many tokens as the staging holds; the stream orders a pass's copies
    // before the next pass's gather overwrites the staging.
    const int64_t per_pass = static_cast<int64_t>(export_dev_.bytes() / (2 * tb));
    for (size_t i = 0; i < ranges.size(); ++i) {
      const KvExportRange& r = ranges[i];
      std::byte* k_host = host + plan.offsets[i];
      std::byte* v_host = k_host + static_cast<size_t>(r.count) * tb;
      for (int64_t done = 0; done < r.count;) {
        const int64_t m = std::min(per_pass, r.count - done);
        const size_t bytes = static_cast<size_t>(m) * tb;
        TANDEM_CUDA_RETURN_IF_ERROR(gather(r, r.first_token + done, m, dev, dev + bytes));
        TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(k_host + done * tb, dev, bytes,
                                                    cudaMemcpyDeviceToHost, export_stream_));
        TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(v_host + done * tb, dev + bytes, bytes,
                                                    cudaMemcpyDeviceToHost, export_stream_));
        done += m;
      }
    }
  }
  TANDEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(export_done_[layer], export_stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::DeliverOldestExport(ExportPlan& plan) {
  const PendingExport& p = plan.pending.front();
  TANDEM_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(export_done_[p.layer]));
  const std::span<const KvExportRange> ranges = plan.batch->exports;
  for (size_t i = 0; i < ranges.size(); ++i) {
    ExportedKv kv;
    kv.layer = p.layer;
    kv.range = static_cast<int32_t>(i);
    kv.k = p.image->bytes_ptr() + plan.offsets[i];
    kv.v = p.image->bytes_ptr() + plan.offsets[i] +
           static_cast<size_t>(ranges[i].count) * plan.token_bytes;
    kv.keep_alive = p.image;
    (*plan.batch->on_kv_export)(std::move(kv));
  }
  plan.pending.pop_front();
  return absl::OkStatus();
}

std::vector<const void*> CudaBackend::GraphAddresses() const {
  return {x_.get(),     act_.get(),     y_.get(),         q_.get(),          attn_.get(),
          cos_sin_.get(), part_o_.get(), part_ml_.get(),   logits_.get(),     meta_dev_.get(),
          d_ids_,       d_pos_,         d_logit_rows_,    d_slots_,          d_chunks_,
          d_tiles_,     d_pick_rows_,   d_tables_,        picks_dev_.get(),  picks_host_.get()};
}

absl::Status CudaBackend::RunAsGraph(int64_t T, int64_t n_logits, int64_t n_picks,
                                     int32_t num_splits, bool* ran) {
  *ran = false;
  const std::pair<int64_t, int32_t> key{T, num_splits};
  std::vector<const void*> addresses = GraphAddresses();
  auto it = graphs_.find(key);
  if (it != graphs_.end() && it->second.addresses != addresses) {
    cudaGraphExecDestroy(it->second.exec);  // a buffer moved: capture again
    graphs_.erase(it);
    it = graphs_.end();
  }
  if (it == graphs_.end()) {
    cudaGraph_t graph = nullptr;
    TANDEM_CUDA_RETURN_IF_ERROR(
        cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    const absl::Status enqueued = EnqueueStep(T, n_logits, n_picks, num_splits, nullptr);
    const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
    cudaGraphExec_t exec = nullptr;
    cudaError_t made = cudaErrorUnknown;
    if (enqueued.ok() && ended == cudaSuccess && graph != nullptr) {
      made = cudaGraphInstantiate(&exec, graph, 0);
    }
    if (graph != nullptr) {
      cudaGraphDestroy(graph);
    }
    if (made != cudaSuccess) {
      // Something in the step cannot be captured here: run every step the ordinary way.
      cudaGetLastError();
      graph_stats_.failed = true;
      return absl::OkStatus();
    }
    it = graphs_.emplace(key, StepGraph{exec, std::move(addresses)}).first;
    ++graph_stats_.captured;
  }
  TANDEM_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(it->second.exec, stream_));
  ++graph_stats_.replayed;
  *ran = true;
  return absl::OkStatus();
}


}  // namespace

CudaGraphStats GetCudaGraphStats(const Backend& backend) {
  const auto* cuda = dynamic_cast<const CudaBackend*>(&backend);
  return cuda != nullptr ? cuda->graph_stats() : CudaGraphStats{};
}

int CudaDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // "no driver" / "no device" are not sticky
    return 0;
  }
  return count;
}

absl::StatusOr<int64_t> CudaFreeMemoryBytes(int device) {
  TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  size_t free_bytes = 0;
  size_t total_bytes = 0;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  return static_cast<int64_t>(free_bytes);
}

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const ModelWeights& model,
                                                           const KvStoreLayout& kv_layout,
                                                           const BackendOptions& options,
                                                           std::vector<float> rope_inv_freq,
                                                           const CudaBackendOptions& cuda) {
  const ModelConfig& c = model.config;
  const KvGeometry want{c.num_layers, c.num_kv_heads, c.head_dim};
  if (!(kv_layout.geometry == want)) {
    return absl::InvalidArgumentError("KV store geometry does not match the model");
  }
  if ((kv_layout.num_blocks <= 0 && options.kv_memory_fraction == 0) ||
      kv_layout.block_size <= 0) {
    return absl::InvalidArgumentError("KV store needs at least one block of at least one token");
  }
  if (!(options.kv_memory_fraction >= 0 && options.kv_memory_fraction <= 1)) {
    return absl::InvalidArgumentError("kv_memory_fraction must be in (0, 1] (0: off)");
  }
  if (!gpu::SupportedHeadDim(c.head_dim)) {
    return absl::UnimplementedError(
        absl::StrCat("cuda backend: head_dim ", c.head_dim, " has no kernels (32, 64, 128)"));
  }
  if (c.num_kv_heads <= 0 || c.num_heads % c.num_kv_heads != 0) {
    return absl::InvalidArgumentError("num_heads must be a multiple of num_kv_heads");
  }
  if (static_cast<int32_t>(rope_inv_freq.size()) != c.head_dim / 2) {
    return absl::InvalidArgumentError("rope_inv_freq must hold head_dim / 2 frequencies");
  }
  if (model.layers.size() != static_cast<size_t>(c.num_layers) || model.embed == nullptr ||
      model.lm_head == nullptr || model.final_norm == nullptr) {
    return absl::InvalidArgumentError("model weights are incomplete");
  }
  if (cuda.max_attention_splits < 1) {
    return absl::InvalidArgumentError("max_attention_splits must be at least 1");
  }
  const int count = CudaDeviceCount();
  if (count == 0) {
    return absl::FailedPreconditionError("cuda backend: no CUDA device is available");
  }
  if (cuda.device < 0 || cuda.device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda backend: device ", cuda.device, " of ", count));
  }
  auto backend = std::make_unique<CudaBackend>(c, kv_layout, options, cuda);
  TANDEM_STATUS_RETURN_IF_ERROR(backend->Init(model, rope_inv_freq));
  return std::unique_ptr<Backend>(std::move(backend));
}

}  // namespace tandem
