// Scalar and bulk dtype conversion.
#include "kvcache/dtype.h"

#include <cmath>

namespace tandem {

std::string_view DTypeName(DType t) {
  switch (t) {
    case DType::kF32:
      return "f32";
    case DType::kF16:
      return "f16";
    case DType::kBF16:
      return "bf16";
  }
  return "unknown";
}

std::optional<DType> ParseDType(std::string_view name) {
  if (name == "f32" || name == "fp32" || name == "float32" || name == "float" || name == "F32") {
    return DType::kF32;
  }
  if (name == "f16" || name == "fp16" || name == "float16" || name == "half" || name == "F16") {
    return DType::kF16;
  }
  if (name == "bf16" || name == "bfloat16" || name == "BF16") {
    return DType::kBF16;
  }
  return std::nullopt;
}

uint16_t F32ToF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) {
    return sign | 0x7e00u;  // NaN
  }
  if (abs >= 0x477ff000u) {  // rounds to >= 65520: Inf
    return sign | 0x7c00u;
  }
  if (abs < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (abs < 0x33000000u) {
      return sign;  // rounds to zero (below half of the smallest subnormal)
    }
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // value = mant * 2^(exp-150) = r * 2^-24
    const uint32_t half_ulp = 1u << (shift - 1);
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    if (rem > half_ulp || (rem == half_ulp && (r & 1u))) {
      ++r;
    }
    return sign | static_cast<uint16_t>(r);
  }
  // Normal: rebias exponent, round mantissa from 23 to 10 bits (nearest even).
  uint32_t h = ((abs >> 13) - ((127 - 15) << 10));
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) {
    ++h;
  }
  return sign | static_cast<uint16_t>(h);
}

void ConvertElements(DType src_type, const void* src, DType dst_type, void* dst, size_t n) {
  if (src_type == dst_type) {
    std::memcpy(dst, src, n * DTypeSize(src_type));
    return;
  }
  const auto* s16 = static_cast<const uint16_t*>(src);
  const auto* s32 = static_cast<const float*>(src);
  auto* d16 = static_cast<uint16_t*>(dst);
  auto* d32 = static_cast<float*>(dst);
  switch (src_type) {
    case DType::kF32:
      if (dst_type == DType::kBF16) {
        for (size_t i = 0; i < n; ++i) d16[i] = F32ToBf16(s32[i]);
      } else {
        for (size_t i = 0; i < n; ++i) d16[i] = F32ToF16(s32[i]);
      }
      return;
    case DType::kBF16:
      if (dst_type == DType::kF32) {
        for (size_t i = 0; i < n; ++i) d32[i] = Bf16ToF32(s16[i]);
      } else {
        for (size_t i = 0; i < n; ++i) d16[i] = F32ToF16(Bf16ToF32(s16[i]));
      }
      return;
    case DType::kF16:
      if (dst_type == DType::kF32) {
        for (size_t i = 0; i < n; ++i) d32[i] = F16ToF32(s16[i]);
      } else {
        for (size_t i = 0; i < n; ++i) d16[i] = F32ToBf16(F16ToF32(s16[i]));
      }
      return;
  }
}

}  // namespace tandem
