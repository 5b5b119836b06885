// Per-sequence sampling: parameters, validation, and the sampler that turns one row of logits
// into a token. All math in fp32 (accumulations in double where sums are long).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/model_config.h"

namespace tandem {

// Unset fields take the model's generation_config.json defaults, then the engine's
// (temperature 1, top_p 1, top_k off, min_p 0, penalties off), as vLLM does.
struct SamplingParams {
  std::optional<float> temperature;  // 0 (or < 1e-5): greedy
  std::optional<float> top_p;        // (0, 1]
  std::optional<int32_t> top_k;      // -1 or 0: off; else >= 1
  std::optional<float> min_p;        // [0, 1]
  std::optional<float> repetition_penalty;  // > 0; 1: off (applies to prompt + output tokens)
  float presence_penalty = 0.0f;     // [-2, 2], output tokens only (OpenAI semantics)
  float frequency_penalty = 0.0f;    // [-2, 2], output tokens only
  std::optional<uint64_t> seed;      // reproducible sampling when set
  int32_t max_tokens = 16;           // >= 1
  int32_t min_tokens = 0;            // EOS/stop tokens are masked before this many outputs
  std::vector<int32_t> stop_token_ids;
  std::vector<std::string> stop;     // stop strings; the text is cut before the match
  bool ignore_eos = false;
  int32_t logprobs = -1;             // -1: none; 0: chosen token only; N: also the top N (<= 20)
};

// Resolved parameters (defaults applied) the sampler runs with.
struct ResolvedSampling {
  float temperature = 1.0f;
  float top_p = 1.0f;
  int32_t top_k = -1;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  bool greedy = false;
};

constexpr int32_t kMaxLogprobs = 20;
constexpr size_t kMaxStopStrings = 16;
constexpr size_t kMaxStopStringBytes = 256;

// INVALID_ARGUMENT naming the field for any out-of-range value (non-finite or negative
// temperature, top_p outside (0, 1], top_k < -1, ...). vocab_size bounds stop_token_ids.
absl::Status ValidateSamplingParams(const SamplingParams& p, int32_t vocab_size);
ResolvedSampling ResolveSampling(const SamplingParams& p, const GenerationDefaults& defaults);

// Deterministic 64-bit generator (xoshiro256**), seeded through splitmix64.
class Rng {
 public:
  explicit Rng(uint64_t seed);
  uint64_t Next();
  double Uniform();  // [0, 1) with 53 random bits
 private:
  uint64_t s_[4];
};

struct SampledToken {
  int32_t token = 0;
  float logprob = 0.0f;  // log-softmax of the raw model logits (before penalties/temperature)
  std::vector<std::pair<int32_t, float>> top_logprobs;  // best first
};

// Token counts a sequence has seen, for penalties. Sparse: touched ids only.
class TokenHistory {
 public:
  void AddPrompt(std::span<const int32_t> ids);
  void AddOutput(int32_t id);
  const std::vector<int32_t>& seen() const { return seen_; }  // distinct ids, prompt or output
  const std::vector<std::pair<int32_t, int32_t>>& output_counts() const { return out_counts_; }

 private:
  std::vector<int32_t> seen_;
  std::vector<uint8_t> seen_mask_;
  std::vector<std::pair<int32_t, int32_t>> out_counts_;  // (id, count)
  std::vector<int32_t> out_index_;                        // id -> index in out_counts_ + 1
};

// Reusable buffers of SampleToken, so that sampling a token allocates nothing once warm.
struct SamplerScratch {
  std::vector<int32_t> ids;
  std::vector<float> raw;
};

// Samples from `logits` (modified in place: penalties, temperature, masks). `banned` ids get
// -inf (min_tokens).
SampledToken SampleToken(std::span<float> logits, const ResolvedSampling& params,
                         const TokenHistory& history, std::span<const int32_t> banned,
                         int32_t num_logprobs, Rng& rng, SamplerScratch& scratch);

// A greedy choice and its raw log-probability: all that a plain greedy sequence needs from a
// row of logits, so a GPU backend can return 8 bytes instead of the row (backend.h).
struct TokenPick {
  int32_t token = 0;
  float logprob = 0.0f;  // log-softmax of the raw logits at `token`
};

// True when SampleToken would return exactly PickGreedy's token and logprob: greedy, no
// penalties, nothing banned, and no top logprobs asked for.
bool PickSuffices(const ResolvedSampling& params, bool banned_any, int32_t num_logprobs);

// The reference for every backend's picks: the first index of the largest logit (NaN counts as
// -inf; 0 when every logit is -inf or NaN) and its log-softmax, computed as SampleToken does.
TokenPick PickGreedy(std::span<const float> logits);

}  // namespace tandem
