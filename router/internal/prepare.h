// The first stage of a Generate call: validate the request against the served model and turn it
// into what the workers get (prompt ids, sampling with max_tokens resolved). Every refusal is
// INVALID_ARGUMENT whose message starts with the offending field.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model_config.h"
#include "engine/tokenizer.h"
#include "kvcache/block_pool.h"
#include "tandem/v1/tandem.pb.h"

namespace tandem {

// The model the router serves, loaded once at start-up (config, tokenizer; no weights).
struct ServedModel {
  std::string name;
  ModelConfig config;
  uint64_t fingerprint = 0;
  std::unique_ptr<Tokenizer> tokenizer;  // null: the folder has none (token-id prompts only)

  int64_t max_model_len() const { return config.max_position_embeddings; }
  int32_t vocab_size() const { return config.vocab_size; }
};

struct PreparedRequest {
  std::vector<int32_t> prompt_ids;
  v1::SamplingParams sampling;  // as the workers get it: max_tokens always set
  int32_t max_tokens = 0;
  int32_t logprobs = -1;  // -1: none; N >= 0: the chosen token's and the top N
  std::vector<std::string> stop;
  std::vector<BlockHash> block_hashes;  // prompt blocks for prefill affinity (filled on demand)
};

// Returns "" when `text` is valid UTF-8, else a description with the byte offset.
std::string Utf8Error(std::string_view text);

// Unset max_tokens is 16, cut to what the context leaves after the prompt.
absl::StatusOr<PreparedRequest> PrepareGenerate(const v1::GenerateRequest& request,
                                                const ServedModel& model);

// The `model` field of a request: empty or the served name.
absl::Status CheckModelName(const std::string& requested, const ServedModel& model);

}  // namespace tandem
