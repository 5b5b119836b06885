// RoPE frequencies, computed in fp32 the way Hugging Face transformers does, so positions match
// the reference to rounding.
#include "engine/internal/rope.h"

#include <cmath>

namespace tandem::internal {

RopeTable RopeTable::Create(const ModelConfig& config) {
  RopeTable t;
  const int64_t dim = config.head_dim;
  const int64_t half = dim / 2;
  t.inv_freq_.resize(half);
  for (int64_t i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(dim);
    t.inv_freq_[i] = 1.0f / std::pow(config.rope_theta, exponent);
  }
  const RopeScaling& rs = config.rope_scaling;
  if (rs.type == RopeScalingType::kLinear) {
    for (float& f : t.inv_freq_) f /= rs.factor;
  } else if (rs.type == RopeScalingType::kLlama3) {
    const double old_ctx = static_cast<double>(rs.original_max_position_embeddings);
    const double low_wavelen = old_ctx / rs.low_freq_factor;
    const double high_wavelen = old_ctx / rs.high_freq_factor;
    for (float& f : t.inv_freq_) {
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > low_wavelen) {
        f = static_cast<float>(f / rs.factor);
      } else if (wavelen >= high_wavelen) {
        const double smooth =
            (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
        f = static_cast<float>((1.0 - smooth) * f / rs.factor + smooth * f);
      }
    }
  }
  return t;
}

void RopeTable::Fill(std::span<const int64_t> positions, std::vector<float>& cos_sin) const {
  const size_t half = inv_freq_.size();
  cos_sin.resize(positions.size() * half * 2);
  for (size_t r = 0; r < positions.size(); ++r) {
    float* c = &cos_sin[r * half * 2];
    float* s = c + half;
    const float p = static_cast<float>(positions[r]);
    for (size_t i = 0; i < half; ++i) {
      const float angle = inv_freq_[i] * p;  // fp32 product, as the reference computes it
      c[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      s[i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
  }
}

}  // namespace tandem::internal
