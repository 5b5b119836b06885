// Rotary position embeddings (HF "rotate_half" convention) with default, linear and llama3
// frequency scaling.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "engine/model_config.h"

namespace tandem::internal {

class RopeTable {
 public:
  static RopeTable Create(const ModelConfig& config);
  // For each position, head_dim floats: cos of the head_dim/2 frequencies, then their sin.
  void Fill(std::span<const int64_t> positions, std::vector<float>& cos_sin) const;
  const std::vector<float>& inv_freq() const { return inv_freq_; }

 private:
  std::vector<float> inv_freq_;
};

// Rotates one head vector x[head_dim] in place with a row of Fill's output.
inline void ApplyRope(float* x, const float* cos_sin, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  const float* c = cos_sin;
  const float* s = cos_sin + half;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i];
    const float x2 = x[i + half];
    x[i] = x1 * c[i] - x2 * s[i];
    x[i + half] = x2 * c[i] + x1 * s[i];
  }
}

}  // namespace tandem::internal
