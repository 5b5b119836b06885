// Element types of weights and KV caches, and scalar conversions between them.
// Conversions round to nearest even, keep NaN/Inf, and never trap.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace tandem {

// Values are part of the KV wire format (docs/kv-wire-format.md): never renumber.
enum class DType : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

constexpr size_t DTypeSize(DType t) { return t == DType::kF32 ? 4 : 2; }
std::string_view DTypeName(DType t);
// Accepts "f32"/"float32"/"fp32", "f16"/"float16"/"fp16"/"half", "bf16"/"bfloat16".
std::optional<DType> ParseDType(std::string_view name);

inline float Bf16ToF32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t F32ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it quiet, never round to Inf.
    return static_cast<uint16_t>((u >> 16) | 0x40);
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float F16ToF32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      u = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

uint16_t F32ToF16(float f);

// Converts n elements from one dtype to another (same dtype: memcpy). src and dst must not overlap.
void ConvertElements(DType src_type, const void* src, DType dst_type, void* dst, size_t n);
// Loads n elements of any dtype as fp32.
inline void ToF32(DType src_type, const void* src, float* dst, size_t n) {
  ConvertElements(src_type, src, DType::kF32, dst, n);
}

}  // namespace tandem
