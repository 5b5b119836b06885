// Model hyper-parameters from a Hugging Face `config.json`, and generation defaults from
// `generation_config.json`. Architectures are data, not classes: one ModelConfig describes every
// supported Llama-family model.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "kvcache/dtype.h"

namespace tandem {

enum class RopeScalingType { kNone, kLinear, kLlama3 };

struct RopeScaling {
  RopeScalingType type = RopeScalingType::kNone;
  float factor = 1.0f;
  float low_freq_factor = 1.0f;   // llama3
  float high_freq_factor = 4.0f;  // llama3
  int64_t original_max_position_embeddings = 8192;  // llama3
};

struct ModelConfig {
  // "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM".
  std::string architecture;
  std::string model_type;  // "llama", "mistral", "qwen2", "qwen3"
  int32_t vocab_size = 0;
  int32_t hidden_size = 0;
  int32_t intermediate_size = 0;
  int32_t num_layers = 0;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;  // defaults to num_heads
  int32_t head_dim = 0;      // defaults to hidden_size / num_heads
  int64_t max_position_embeddings = 0;
  float rms_norm_eps = 1e-6f;
  float rope_theta = 10000.0f;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v projections carry a bias (Qwen2 always; Llama if set)
  bool qk_norm = false;         // per-head RMSNorm on q and k before RoPE (Qwen3)
  std::optional<int64_t> sliding_window;  // Mistral when set and enabled
  std::optional<int32_t> bos_token_id;
  std::vector<int32_t> eos_token_ids;  // config.json's eos_token_id (int or list)
  DType torch_dtype = DType::kF32;

  // Parses and validates config.json text. Unknown architectures, unsupported values
  // (hidden_act other than silu, rope_scaling types other than linear/llama3, non-positive or
  // inconsistent sizes) are refused with INVALID_ARGUMENT naming the field.
  static absl::StatusOr<ModelConfig> FromJson(std::string_view json_text);
  static absl::StatusOr<ModelConfig> FromFile(const std::string& path);

  // Hash of the hyper-parameters that decide KV layout and numerics (used as model fingerprint
  // together with the weights' identity).
  uint64_t Fingerprint() const;
};

// Sampling defaults of generation_config.json (absent fields stay unset).
struct GenerationDefaults {
  std::vector<int32_t> eos_token_ids;
  std::optional<int32_t> bos_token_id;
  std::optional<bool> do_sample;
  std::optional<float> temperature;
  std::optional<float> top_p;
  std::optional<int32_t> top_k;
  std::optional<float> min_p;
  std::optional<float> repetition_penalty;
  std::optional<int32_t> max_new_tokens;

  static absl::StatusOr<GenerationDefaults> FromJson(std::string_view json_text);
  // A missing file gives empty defaults; a malformed one is an error.
  static absl::StatusOr<GenerationDefaults> FromFileOrEmpty(const std::string& path);
};

}  // namespace tandem
