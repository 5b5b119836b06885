// A loaded model: hyper-parameters, generation defaults and the weight tensors of every layer,
// resolved by Hugging Face name once at load time.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model_config.h"
#include "engine/safetensors.h"

namespace tandem {

struct LayerWeights {
  const TensorView* attn_norm = nullptr;
  const TensorView* wq = nullptr;
  const TensorView* wk = nullptr;
  const TensorView* wv = nullptr;
  const TensorView* wo = nullptr;
  const TensorView* bq = nullptr;  // attention bias (Qwen2), else null
  const TensorView* bk = nullptr;
  const TensorView* bv = nullptr;
  const TensorView* q_norm = nullptr;  // Qwen3, else null
  const TensorView* k_norm = nullptr;
  const TensorView* mlp_norm = nullptr;
  const TensorView* w_gate = nullptr;
  const TensorView* w_up = nullptr;
  const TensorView* w_down = nullptr;
};

struct ModelWeights {
  std::string dir;
  ModelConfig config;
  GenerationDefaults generation;
  std::unique_ptr<WeightSet> weights;
  const TensorView* embed = nullptr;
  std::vector<LayerWeights> layers;
  const TensorView* final_norm = nullptr;
  const TensorView* lm_head = nullptr;  // == embed when embeddings are tied
  // Model identity for the KV data plane and the router: config fingerprint mixed with a hash
  // of the weight file headers (sizes, names, dtypes).
  uint64_t fingerprint = 0;
};

// Loads config.json, generation_config.json (optional) and the safetensors weights of `dir`,
// checking every tensor's presence, dtype and shape against the config.
absl::StatusOr<std::unique_ptr<ModelWeights>> LoadModelWeights(const std::string& dir);

}  // namespace tandem
