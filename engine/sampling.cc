// Sampling: validation, defaults, penalties, top-k/top-p/min-p, seeded draws, logprobs.
#include "engine/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace tandem {
namespace {

constexpr float kGreedyTemperature = 1e-5f;

absl::Status Bad(std::string_view field, std::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat(std::string(field), ": ", std::string(why)));
}

}  // namespace

absl::Status ValidateSamplingParams(const SamplingParams& p, int32_t vocab_size) {
  if (p.temperature && (!std::isfinite(*p.temperature) || *p.temperature < 0)) {
    return Bad("temperature", "must be a finite number >= 0");
  }
  if (p.top_p && (!std::isfinite(*p.top_p) || *p.top_p <= 0 || *p.top_p > 1)) {
    return Bad("top_p", "must be in (0, 1]");
  }
  if (p.top_k && *p.top_k < -1) {
    return Bad("top_k", "must be -1 (off), 0 (off) or >= 1");
  }
  if (p.min_p && (!std::isfinite(*p.min_p) || *p.min_p < 0 || *p.min_p > 1)) {
    return Bad("min_p", "must be in [0, 1]");
  }
  if (p.repetition_penalty &&
      (!std::isfinite(*p.repetition_penalty) || *p.repetition_penalty <= 0)) {
    return Bad("repetition_penalty", "must be a finite number > 0");
  }
  if (!std::isfinite(p.presence_penalty) || p.presence_penalty < -2 || p.presence_penalty > 2) {
    return Bad("presence_penalty", "must be in [-2, 2]");
  }
  if (!std::isfinite(p.frequency_penalty) || p.frequency_penalty < -2 ||
      p.frequency_penalty > 2) {
    return Bad("frequency_penalty", "must be in [-2, 2]");
  }
  if (p.max_tokens < 1) {
    return Bad("max_tokens", "must be >= 1");
  }
  if (p.min_tokens < 0 || p.min_tokens > p.max_tokens) {
    return Bad("min_tokens", "must be in [0, max_tokens]");
  }
  for (int32_t id : p.stop_token_ids) {
    if (id < 0 || id >= vocab_size) {
      return Bad("stop_token_ids", absl::StrCat("id ", id, " is outside the vocabulary [0, ",
                                                vocab_size, ")"));
    }
  }
  if (p.stop.size() > kMaxStopStrings) {
    return Bad("stop", absl::StrCat("at most ", kMaxStopStrings, " stop strings"));
  }
  for (const std::string& s : p.stop) {
    if (s.empty() || s.size() > kMaxStopStringBytes) {
      return Bad("stop", absl::StrCat("each stop string must be 1 to ", kMaxStopStringBytes,
                                      " bytes"));
    }
  }
  if (p.logprobs < -1 || p.logprobs > kMaxLogprobs) {
    return Bad("logprobs", absl::StrCat("must be in [-1, ", kMaxLogprobs, "]"));
  }
  return absl::OkStatus();
}

ResolvedSampling ResolveSampling(const SamplingParams& p, const GenerationDefaults& d) {
  ResolvedSampling r;
  // generation_config's do_sample=false means greedy unless the request asks otherwise.
  const bool default_greedy = d.do_sample.has_value() && !*d.do_sample;
  r.temperature = p.temperature.value_or(default_greedy ? 0.0f : d.temperature.value_or(1.0f));
  r.top_p = p.top_p.value_or(d.top_p.value_or(1.0f));
  r.top_k = p.top_k.value_or(d.top_k.value_or(-1));
  if (r.top_k == 0) {
    r.top_k = -1;
  }
  r.min_p = p.min_p.value_or(d.min_p.value_or(0.0f));
  r.repetition_penalty = p.repetition_penalty.value_or(d.repetition_penalty.value_or(1.0f));
  r.presence_penalty = p.presence_penalty;
  r.frequency_penalty = p.frequency_penalty;
  r.greedy = r.temperature < kGreedyTemperature;
  return r;
}

namespace {
uint64_t SplitMix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
}  // namespace

Rng::Rng(uint64_t seed) {
  for (uint64_t& s : s_) s = SplitMix64(seed);
}

uint64_t Rng::Next() {
  const uint64_t result = Rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = Rotl(s_[3], 45);
  return result;
}

double Rng::Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

void TokenHistory::AddPrompt(std::span<const int32_t> ids) {
  for (int32_t id : ids) {
    if (id < 0) continue;
    if (static_cast<size_t>(id) >= seen_mask_.size()) seen_mask_.resize(id + 1, 0);
    if (!seen_mask_[id]) {
      seen_mask_[id] = 1;
      seen_.push_back(id);
    }
  }
}

void TokenHistory::AddOutput(int32_t id) {
  if (id < 0) return;
  AddPrompt(std::span<const int32_t>(&id, 1));
  if (static_cast<size_t>(id) >= out_index_.size()) out_index_.resize(id + 1, 0);
  if (out_index_[id] == 0) {
    out_counts_.emplace_back(id, 1);
    out_index_[id] = static_cast<int32_t>(out_counts_.size());
  } else {
    ++out_counts_[out_index_[id] - 1].second;
  }
}

namespace {

// log-softmax statistics of a row: max and log(sum(exp(x - max))).
void LogSoftmaxStats(std::span<const float> x, float& max_out, double& log_z) {
  float m = -std::numeric_limits<float>::infinity();
  for (float v : x) m = std::max(m, v);
  double z = 0;
  for (float v : x) z += std::exp(static_cast<double>(v - m));
  max_out = m;
  log_z = std::log(z);
}

}  // namespace

SampledToken SampleToken(std::span<float> logits, const ResolvedSampling& params,
                         const TokenHistory& history, std::span<const int32_t> banned,
                         int32_t num_logprobs, Rng& rng, SamplerScratch& scr) {
  std::vector<int32_t>& scratch = scr.ids;
  const int32_t vocab = static_cast<int32_t>(logits.size());
  SampledToken out;

  // Logprobs of the raw distribution, before any processing.
  float raw_max = 0;
  double raw_log_z = 0;
  const bool want_logprobs = num_logprobs >= 0;
  if (want_logprobs) {
    LogSoftmaxStats(logits, raw_max, raw_log_z);
    if (num_logprobs > 0) {
      scratch.resize(vocab);
      std::iota(scratch.begin(), scratch.end(), 0);
      const int32_t n = std::min(num_logprobs, vocab);
      std::partial_sort(scratch.begin(), scratch.begin() + n, scratch.end(),
                        [&](int32_t a, int32_t b) {
                          return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
                        });
      for (int32_t i = 0; i < n; ++i) {
        const int32_t id = scratch[i];
        out.top_logprobs.emplace_back(
            id, static_cast<float>(logits[id] - raw_max - raw_log_z));
      }
    }
  }
  // The chosen token's logprob needs its raw logit, which processing below overwrites.
  if (want_logprobs) scr.raw.assign(logits.begin(), logits.end());

  // Non-finite logits never become a NaN sample: treat NaN as -inf.
  for (float& v : logits) {
    if (std::isnan(v)) v = -std::numeric_limits<float>::infinity();
  }
  // Penalties.
  if (params.repetition_penalty != 1.0f) {
    for (int32_t id : history.seen()) {
      if (id >= vocab) continue;
      float& v = logits[id];
      v = v > 0 ? v / params.repetition_penalty : v * params.repetition_penalty;
    }
  }
  if (params.presence_penalty != 0.0f || params.frequency_penalty != 0.0f) {
    for (const auto& [id, count] : history.output_counts()) {
      if (id >= vocab) continue;
      logits[id] -= params.presence_penalty + params.frequency_penalty * count;
    }
  }
  for (int32_t id : banned) {
    if (id >= 0 && id < vocab) logits[id] = -std::numeric_limits<float>::infinity();
  }

  int32_t chosen = 0;
  if (params.greedy) {
    float best = -std::numeric_limits<float>::infinity();
    for (int32_t i = 0; i < vocab; ++i) {
      if (logits[i] > best) {
        best = logits[i];
        chosen = i;
      }
    }
  } else {
    const float inv_t = 1.0f / params.temperature;
    float m = -std::numeric_limits<float>::infinity();
    for (float& v : logits) {
      v *= inv_t;
      m = std::max(m, v);
    }
    // Probabilities (unnormalised) in place.
    for (float& v : logits) v = std::exp(v - m);
    // Candidates: every id in id order for plain temperature sampling; sorted by probability
    // (descending, ties by id) when a filter needs the order.
    scratch.resize(vocab);
    std::iota(scratch.begin(), scratch.end(), 0);
    int32_t n = vocab;
    auto by_prob = [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    };
    const bool filtered = params.top_k > 0 || params.min_p > 0 || params.top_p < 1.0f;
    if (params.top_k > 0 && params.top_k < vocab) {
      n = params.top_k;
      std::partial_sort(scratch.begin(), scratch.begin() + n, scratch.end(), by_prob);
    } else if (filtered) {
      std::sort(scratch.begin(), scratch.end(), by_prob);
    }
    double mass = 0;
    for (int32_t i = 0; i < n; ++i) mass += logits[scratch[i]];
    if (params.min_p > 0 && n > 0) {
      const double threshold = params.min_p * logits[scratch[0]];
      int32_t keep = 1;
      while (keep < n && logits[scratch[keep]] >= threshold) ++keep;
      n = keep;
      mass = 0;
      for (int32_t i = 0; i < n; ++i) mass += logits[scratch[i]];
    }
    if (params.top_p < 1.0f) {
      double cum = 0;
      int32_t keep = 0;
      while (keep < n) {
        cum += logits[scratch[keep]];
        ++keep;
        if (cum >= params.top_p * mass) break;
      }
      n = keep;
      mass = cum;
    }
    const double r = rng.Uniform() * mass;
    double cum = 0;
    // Rounding can leave r past the last bucket: fall back to the most likely candidate.
    chosen = filtered ? scratch[0]
                      : static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) -
                                             logits.begin());
    for (int32_t i = 0; i < n; ++i) {
      cum += logits[scratch[i]];
      if (r < cum) {
        chosen = scratch[i];
        break;
      }
    }
  }
  out.token = chosen;
  if (want_logprobs) {
    out.logprob = static_cast<float>(scr.raw[chosen] - raw_max - raw_log_z);
  }
  return out;
}

bool PickSuffices(const ResolvedSampling& params, bool banned_any, int32_t num_logprobs) {
  return params.greedy && params.repetition_penalty == 1.0f && params.presence_penalty == 0.0f &&
         params.frequency_penalty == 0.0f && !banned_any && num_logprobs <= 0;
}

TokenPick PickGreedy(std::span<const float> logits) {
  TokenPick p;
  float best = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < logits.size(); ++i) {
    if (logits[i] > best) {  // false for NaN
      best = logits[i];
      p.token = static_cast<int32_t>(i);
    }
  }
  float raw_max = 0;
  double raw_log_z = 0;
  LogSoftmaxStats(logits, raw_max, raw_log_z);
  p.logprob = static_cast<float>(logits[p.token] - raw_max - raw_log_z);
  return p;
}

}  // namespace tandem
