// Creates model folders with deterministic random weights: the engine's own demo model and the
// benchmark models (e.g. Qwen2.5-0.5B or Llama-3-8B shaped) without downloading anything.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "engine/model_config.h"

namespace tandem {

struct RandomModelSpec {
  std::string architecture = "LlamaForCausalLM";  // or Qwen2ForCausalLM, Qwen3ForCausalLM, ...
  int32_t vocab_size = 512;  // at least 258 when a byte-level tokenizer is written
  int32_t hidden_size = 128;
  int32_t intermediate_size = 344;
  int32_t num_layers = 2;
  int32_t num_heads = 4;
  int32_t num_kv_heads = 2;
  int32_t head_dim = 0;  // 0: hidden / heads
  int64_t max_position_embeddings = 2048;
  float rope_theta = 500000.0f;
  bool tie_word_embeddings = false;
  DType dtype = DType::kBF16;
  uint64_t seed = 1;
  bool write_tokenizer = true;  // a byte-level BPE tokenizer.json (256 bytes + BOS + EOS)
};

// Named shapes: "demo" (tiny Llama-3 style), "qwen2.5-0.5b", "llama-3.2-1b", "llama-3-8b".
absl::StatusOr<RandomModelSpec> RandomModelPreset(const std::string& name);

// Writes config.json, generation_config.json, model.safetensors (and tokenizer files) into dir.
absl::Status WriteRandomModel(const std::string& dir, const RandomModelSpec& spec);

}  // namespace tandem
