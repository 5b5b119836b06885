// Inner loops of the CPU backend: fp32 compute over bf16/fp16/fp32 weights.
// Each output element is accumulated in the same order whatever the batch around it, so a
// sequence's results do not depend on what else is in the batch (batch invariance).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvcache/dtype.h"

namespace tandem::cpu {

// y[m][n] = sum_k x[m][k] * w[n][k] for m in [0, M), n in [n_begin, n_end).
// x: M rows of K floats with row stride ldx; y: rows of stride ldy; w: N rows of K elements of
// `wtype`, row stride K.
void LinearRows(const float* x, int64_t M, int64_t ldx, const void* w, DType wtype, int64_t K,
                int64_t n_begin, int64_t n_end, float* y, int64_t ldy);

// Dot product of n floats (8-lane accumulation, fixed order).
float Dot(const float* a, const float* b, int64_t n);

// out = x * rsqrt(mean(x^2) + eps) * weight (weight of dtype wtype, n elements).
void RmsNorm(const float* x, const void* weight, DType wtype, int64_t n, float eps, float* out);

// Loads n elements of weight dtype into fp32.
void LoadRow(const void* w, DType wtype, int64_t n, float* out);

// y[i] += s * x[i]
void Axpy(float s, const float* x, float* y, int64_t n);

}  // namespace tandem::cpu
