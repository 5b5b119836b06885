// Resolves a Hugging Face Llama-family checkpoint into per-layer weight views.
#include "engine/model.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "xxhash.h"

namespace tandem {
absl::StatusOr<std::unique_ptr<ModelWeights>> LoadModelWeights(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat("model folder '", dir, "' does not exist"));
  }
  auto m = std::make_unique<ModelWeights>();
  m->dir = dir;
  auto config = ModelConfig::FromFile((fs::path(dir) / "config.json").string());
  if (!config.ok()) {
    return config.status();
  }
  m->config = *std::move(config);
  auto gen = GenerationDefaults::FromFileOrEmpty((fs::path(dir) / "generation_config.json").string());
  if (!gen.ok()) {
    return gen.status();
  }
  m->generation = *std::move(gen);
  auto weights = WeightSet::OpenDir(dir);
  if (!weights.ok()) {
    return weights.status();
  }
  m->weights = *std::move(weights);

  const ModelConfig& c = m->config;
  const WeightSet& w = *m->weights;
  const int64_t H = c.hidden_size;
  const int64_t q_dim = static_cast<int64_t>(c.num_heads) * c.head_dim;
  const int64_t kv_dim = static_cast<int64_t>(c.num_kv_heads) * c.head_dim;
  const int64_t I = c.intermediate_size;
  const int64_t V = c.vocab_size;

#define TANDEM_ASSIGN_TENSOR(dst, name, ...)                 \
  do {                                                       \
    auto t_ = w.Require(name, std::vector<int64_t>__VA_ARGS__); \
    if (!t_.ok()) return t_.status();                        \
    dst = *t_;                                               \
  } while (0)

  TANDEM_ASSIGN_TENSOR(m->embed, "model.embed_tokens.weight", {V, H});
  TANDEM_ASSIGN_TENSOR(m->final_norm, "model.norm.weight", {H});
  if (c.tie_word_embeddings && w.Find("lm_head.weight") == nullptr) {
    m->lm_head = m->embed;
  } else {
    TANDEM_ASSIGN_TENSOR(m->lm_head, "lm_head.weight", {V, H});
  }
  m->layers.resize(c.num_layers);
  for (int32_t l = 0; l < c.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    LayerWeights& L = m->layers[l];
    TANDEM_ASSIGN_TENSOR(L.attn_norm, p + "input_layernorm.weight", {H});
    TANDEM_ASSIGN_TENSOR(L.wq, p + "self_attn.q_proj.weight", {q_dim, H});
    TANDEM_ASSIGN_TENSOR(L.wk, p + "self_attn.k_proj.weight", {kv_dim, H});
    TANDEM_ASSIGN_TENSOR(L.wv, p + "self_attn.v_proj.weight", {kv_dim, H});
    TANDEM_ASSIGN_TENSOR(L.wo, p + "self_attn.o_proj.weight", {H, q_dim});
    if (c.attention_bias) {
      TANDEM_ASSIGN_TENSOR(L.bq, p + "self_attn.q_proj.bias", {q_dim});
      TANDEM_ASSIGN_TENSOR(L.bk, p + "self_attn.k_proj.bias", {kv_dim});
      TANDEM_ASSIGN_TENSOR(L.bv, p + "self_attn.v_proj.bias", {kv_dim});
    }
    if (c.qk_norm) {
      TANDEM_ASSIGN_TENSOR(L.q_norm, p + "self_attn.q_norm.weight", {c.head_dim});
      TANDEM_ASSIGN_TENSOR(L.k_norm, p + "self_attn.k_norm.weight", {c.head_dim});
    }
    TANDEM_ASSIGN_TENSOR(L.mlp_norm, p + "post_attention_layernorm.weight", {H});
    TANDEM_ASSIGN_TENSOR(L.w_gate, p + "mlp.gate_proj.weight", {I, H});
    TANDEM_ASSIGN_TENSOR(L.w_up, p + "mlp.up_proj.weight", {I, H});
    TANDEM_ASSIGN_TENSOR(L.w_down, p + "mlp.down_proj.weight", {H, I});
  }
#undef TANDEM_ASSIGN_TENSOR

  // Identity: hyper-parameters plus a sample of every tensor's bytes (first and last 64), so two
  // different checkpoints of one architecture get different fingerprints without hashing GBs.
  uint64_t h = c.Fingerprint();
  auto mix = [&](const TensorView* t) {
    if (t == nullptr) return;
    h = XXH3_64bits_withSeed(t->name.data(), t->name.size(), h);
    const size_t n = std::min<size_t>(64, t->nbytes);
    h = XXH3_64bits_withSeed(t->data, n, h);
    h = XXH3_64bits_withSeed(t->data + t->nbytes - n, n, h);
  };
  mix(m->embed);
  mix(m->lm_head);
  mix(m->final_norm);
  for (const LayerWeights& L : m->layers) {
    for (const TensorView* t : {L.attn_norm, L.wq, L.wk, L.wv, L.wo, L.bq, L.bk, L.bv, L.q_norm,
                                L.k_norm, L.mlp_norm, L.w_gate, L.w_up, L.w_down}) {
      mix(t);
    }
  }
  m->fingerprint = h;
  return m;
}

}  // namespace tandem
