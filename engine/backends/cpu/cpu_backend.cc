// CPU backend: fp32 activations, weights read in their stored dtype, KV in a HostKvStore.
#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend.h"
#include "engine/backends/cpu/cpu_kernels.h"
#include "engine/internal/rope.h"
#include "engine/internal/thread_pool.h"
#include "engine/model.h"

#if defined(TANDEM_HAVE_CUDA_BACKEND)
#include "engine/backends/cuda/cuda_backend.h"
#endif

namespace tandem {
namespace {

using internal::ThreadPool;

class CpuBackend final : public Backend {
 public:
  CpuBackend(const ModelWeights& model, const KvStoreLayout& layout, const BackendOptions& options)
      : model_(model),
        cfg_(model.config),
        store_(layout),
        pool_(options.num_threads),
        rope_(internal::RopeTable::Create(cfg_)) {}

  std::string_view name() const override { return "cpu"; }
  KvStore& kv_store() override { return store_; }
  absl::Status Forward(const ForwardBatch& batch, std::span<float> logits) override;

 private:
  // y = x W^T over all rows, parallel over output features in groups of four.
  void Linear(const float* x, int64_t M, const TensorView& w, float* y) {
    const int64_t N = w.shape[0];
    const int64_t K = w.shape[1];
    const int64_t groups = (N + 3) / 4;
    // Aim for chunks of at least ~64k multiply-adds so small matrices stay on one thread.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, M * K / 4));
    pool_.ParallelFor(groups, grain, [&](int64_t g0, int64_t g1) {
      cpu::LinearRows(x, M, K, w.data, w.dtype, K, g0 * 4, std::min(N, g1 * 4), y, N);
    });
  }

  void AddBias(float* y, int64_t M, const TensorView* b) {
    if (b == nullptr) return;
    const int64_t N = b->shape[0];
    bias_.resize(N);
    cpu::LoadRow(b->data, b->dtype, N, bias_.data());
    for (int64_t m = 0; m < M; ++m) {
      float* row = y + m * N;
      for (int64_t n = 0; n < N; ++n) row[n] += bias_[n];
    }
  }

  void Attention(int32_t layer, std::span<const SequenceChunk> chunks, int64_t T);

  const ModelWeights& model_;
  const ModelConfig& cfg_;
  HostKvStore store_;
  ThreadPool pool_;
  internal::RopeTable rope_;

  // Step buffers, grown on demand and reused.
  std::vector<float> x_, h_, q_, k_, v_, attn_, gate_, up_, tmp_, bias_, cos_sin_;
  std::vector<int64_t> pos_;
  std::vector<int32_t> row_chunk_;
};

absl::Status CpuBackend::Forward(const ForwardBatch& batch, std::span<float> logits) {
  const int64_t H = cfg_.hidden_size;
  const int64_t hd = cfg_.head_dim;
  const int64_t nh = cfg_.num_heads;
  const int64_t nkv = cfg_.num_kv_heads;
  const int64_t q_dim = nh * hd;
  const int64_t kv_dim = nkv * hd;
  const int64_t I = cfg_.intermediate_size;
  const int64_t V = cfg_.vocab_size;

  int64_t T = 0;
  int64_t n_logits = 0;
  for (const SequenceChunk& c : batch.chunks) {
    T += static_cast<int64_t>(c.tokens.size());
    n_logits += c.want_logits ? 1 : 0;
    if (absl::Status s = ValidateTokenRange(store_.layout(), 0, c.block_table, c.start_pos,
                                            static_cast<int64_t>(c.tokens.size()));
        !s.ok()) {
      return s;
    }
  }
  if (absl::Status s = ValidateExports(batch); !s.ok()) {
    return s;
  }
  if (static_cast<int64_t>(logits.size()) < n_logits * V) {
    return absl::InvalidArgumentError("logits buffer too small");
  }
  if (T == 0) {
    return absl::OkStatus();
  }
  x_.resize(T * H);
  h_.resize(T * H);
  q_.resize(T * q_dim);
  k_.resize(T * kv_dim);
  v_.resize(T * kv_dim);
  attn_.resize(T * q_dim);
  gate_.resize(T * I);
  up_.resize(T * I);
  tmp_.resize(T * std::max(H, q_dim));
  pos_.resize(T);
  row_chunk_.resize(T);

  // Embedding rows and positions.
  {
    int64_t r = 0;
    for (size_t ci = 0; ci < batch.chunks.size(); ++ci) {
      const SequenceChunk& c = batch.chunks[ci];
      for (size_t i = 0; i < c.tokens.size(); ++i, ++r) {
        const int32_t id = c.tokens[i];
        if (id < 0 || id >= V) {
          return absl::InvalidArgumentError(absl::StrCat("token id ", id, " out of vocabulary"));
        }
        const std::byte* src = model_.embed->data + static_cast<size_t>(id) * H *
                                                        DTypeSize(model_.embed->dtype);
        cpu::LoadRow(src, model_.embed->dtype, H, &x_[r * H]);
        pos_[r] = c.start_pos + static_cast<int64_t>(i);
        row_chunk_[r] = static_cast<int32_t>(ci);
      }
    }
  }
  rope_.Fill(pos_, cos_sin_);

  const float eps = cfg_.rms_norm_eps;
  auto norm_rows = [&](const TensorView& w, const float* in, float* out) {
    pool_.ParallelFor(T, 8, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        cpu::RmsNorm(in + r * H, w.data, w.dtype, H, eps, out + r * H);
      }
    });
  };

  for (int32_t l = 0; l < cfg_.num_layers; ++l) {
    const LayerWeights& L = model_.layers[l];
    norm_rows(*L.attn_norm, x_.data(), h_.data());
    Linear(h_.data(), T, *L.wq, q_.data());
    Linear(h_.data(), T, *L.wk, k_.data());
    Linear(h_.data(), T, *L.wv, v_.data());
    AddBias(q_.data(), T, L.bq);
    AddBias(k_.data(), T, L.bk);
    AddBias(v_.data(), T, L.bv);
    if (L.q_norm != nullptr) {
      pool_.ParallelFor(T, 4, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          for (int64_t h = 0; h < nh; ++h) {
            float* p = &q_[r * q_dim + h * hd];
            cpu::RmsNorm(p, L.q_norm->data, L.q_norm->dtype, hd, eps, p);
          }
          for (int64_t h = 0; h < nkv; ++h) {
            float* p = &k_[r * kv_dim + h * hd];
            cpu::RmsNorm(p, L.k_norm->data, L.k_norm->dtype, hd, eps, p);
          }
        }
      });
    }
    pool_.ParallelFor(T, 4, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const float* cs = &cos_sin_[r * hd];
        for (int64_t h = 0; h < nh; ++h) internal::ApplyRope(&q_[r * q_dim + h * hd], cs, hd);
        for (int64_t h = 0; h < nkv; ++h) internal::ApplyRope(&k_[r * kv_dim + h * hd], cs, hd);
      }
    });
    // This step's K/V into the paged store (canonical layout == our row layout per chunk).
    {
      int64_t r = 0;
      for (const SequenceChunk& c : batch.chunks) {
        const int64_t n = static_cast<int64_t>(c.tokens.size());
        absl::Status s = store_.WriteTokens(l, c.block_table, c.start_pos, n, DType::kF32,
                                            &k_[r * kv_dim], &v_[r * kv_dim]);
        if (!s.ok()) {
          return s;
        }
        r += n;
      }
    }
    // The layer's KV is final: hand it to the data plane before attention and the MLP run.
    if (absl::Status s = ExportLayerFromStore(store_, l, batch); !s.ok()) {
      return s;
    }
    Attention(l, batch.chunks, T);
    Linear(attn_.data(), T, *L.wo, tmp_.data());
    for (int64_t i = 0; i < T * H; ++i) x_[i] += tmp_[i];

    norm_rows(*L.mlp_norm, x_.data(), h_.data());
    Linear(h_.data(), T, *L.w_gate, gate_.data());
    Linear(h_.data(), T, *L.w_up, up_.data());
    for (int64_t i = 0; i < T * I; ++i) {
      const float g = gate_[i];
      gate_[i] = g / (1.0f + std::exp(-g)) * up_[i];
    }
    Linear(gate_.data(), T, *L.w_down, tmp_.data());
    for (int64_t i = 0; i < T * H; ++i) x_[i] += tmp_[i];

  }

  // Final norm and LM head for the last token of every chunk that wants logits.
  if (n_logits > 0) {
    std::vector<float>& last = h_;  // reuse: n_logits <= T rows
    int64_t r = 0;
    int64_t j = 0;
    for (const SequenceChunk& c : batch.chunks) {
      r += static_cast<int64_t>(c.tokens.size());
      if (c.want_logits) {
        cpu::RmsNorm(&x_[(r - 1) * H], model_.final_norm->data, model_.final_norm->dtype, H, eps,
                     &last[j * H]);
        ++j;
      }
    }
    Linear(last.data(), n_logits, *model_.lm_head, logits.data());
  }
  return absl::OkStatus();
}

void CpuBackend::Attention(int32_t layer, std::span<const SequenceChunk> chunks, int64_t T) {
  const int64_t hd = cfg_.head_dim;
  const int64_t nh = cfg_.num_heads;
  const int64_t nkv = cfg_.num_kv_heads;
  const int64_t group = nh / nkv;
  const int64_t q_dim = nh * hd;
  const int64_t te = nkv * hd;
  const int32_t bs = store_.layout().block_size;
  const DType kv_type = store_.layout().dtype;
  const size_t esize = DTypeSize(kv_type);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int64_t window = cfg_.sliding_window.value_or(0);

  pool_.ParallelFor(T * nkv, 1, [&](int64_t b, int64_t e) {
    thread_local std::vector<float> scores;
    thread_local std::vector<float> kbuf;
    thread_local std::vector<float> vbuf;
    for (int64_t task = b; task < e; ++task) {
      const int64_t r = task / nkv;
      const int64_t kvh = task % nkv;
      const SequenceChunk& c = chunks[row_chunk_[r]];
      const int64_t pos = pos_[r];
      const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      const int64_t ctx = pos + 1 - first;
      scores.resize(static_cast<size_t>(ctx) * group);
      if (kv_type != DType::kF32) {
        kbuf.resize(hd);
        vbuf.resize(hd);
      }
      auto k_at = [&](int64_t p) -> const float* {
        const std::byte* blk = store_.KBlock(layer, c.block_table[p / bs]);
        const std::byte* src = blk + ((p % bs) * te + kvh * hd) * esize;
        if (kv_type == DType::kF32) return reinterpret_cast<const float*>(src);
        ToF32(kv_type, src, kbuf.data(), hd);
        return kbuf.data();
      };
      auto v_at = [&](int64_t p) -> const float* {
        const std::byte* blk = store_.VBlock(layer, c.block_table[p / bs]);
        const std::byte* src = blk + ((p % bs) * te + kvh * hd) * esize;
        if (kv_type == DType::kF32) return reinterpret_cast<const float*>(src);
        ToF32(kv_type, src, vbuf.data(), hd);
        return vbuf.data();
      };
      // Scores for every query head of this KV head's group.
      std::vector<float>& s = scores;
      for (int64_t j = 0; j < ctx; ++j) {
        const float* kp = k_at(first + j);
        for (int64_t g = 0; g < group; ++g) {
          const float* qp = &q_[r * q_dim + (kvh * group + g) * hd];
          s[g * ctx + j] = cpu::Dot(qp, kp, hd) * scale;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sg = &s[g * ctx];
        float mx = sg[0];
        for (int64_t j = 1; j < ctx; ++j) mx = std::max(mx, sg[j]);
        float sum = 0;
        for (int64_t j = 0; j < ctx; ++j) {
          sg[j] = std::exp(sg[j] - mx);
          sum += sg[j];
        }
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < ctx; ++j) sg[j] *= inv;
        float* out = &attn_[r * q_dim + (kvh * group + g) * hd];
        std::fill(out, out + hd, 0.0f);
      }
      for (int64_t j = 0; j < ctx; ++j) {
        const float* vp = v_at(first + j);
        for (int64_t g = 0; g < group; ++g) {
          cpu::Axpy(s[g * ctx + j], vp, &attn_[r * q_dim + (kvh * group + g) * hd], hd);
        }
      }
    }
  });
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(const ModelWeights& model,
                                                          const KvStoreLayout& kv_layout,
                                                          const BackendOptions& options) {
  const ModelConfig& c = model.config;
  const KvGeometry want{c.num_layers, c.num_kv_heads, c.head_dim};
  if (!(kv_layout.geometry == want)) {
    return absl::InvalidArgumentError("KV store geometry does not match the model");
  }
  if (options.kv_memory_fraction != 0) {
    return absl::InvalidArgumentError(
        "kv_memory_fraction sizes a GPU's KV pool; the cpu backend takes kv_cache_bytes "
        "(--kv-cache-mb) or num_kv_blocks");
  }
  if (kv_layout.num_blocks <= 0 || kv_layout.block_size <= 0) {
    return absl::InvalidArgumentError("KV store needs at least one block of at least one token");
  }
  return std::unique_ptr<Backend>(new CpuBackend(model, kv_layout, options));
}

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(std::string_view kind,
                                                       const ModelWeights& model,
                                                       const KvStoreLayout& kv_layout,
                                                       const BackendOptions& options) {
  if (kind == "cpu") {
    return CreateCpuBackend(model, kv_layout, options);
  }
#if defined(TANDEM_HAVE_CUDA_BACKEND)
  if (kind == "cuda") {
    CudaBackendOptions cuda;
    cuda.activation_precision = options.gpu_exact_activations
                                    ? GpuActivationPrecision::kSplit
                                    : GpuActivationPrecision::kWeightDtype;
    cuda.cuda_graphs = options.gpu_graphs;
    return CreateCudaBackend(model, kv_layout, options,
                             internal::RopeTable::Create(model.config).inv_freq(), cuda);
  }
#endif
  if (kind == "cuda" || kind == "hip") {
    return absl::UnimplementedError(absl::StrCat(
        "backend '", std::string(kind), "' is not available in this build (rebuild with it enabled)"));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown backend '", std::string(kind), "' (expected cpu, cuda or hip)"));
}

}  // namespace tandem
