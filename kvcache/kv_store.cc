// Host KV store and canonical-layout conversion.
#include "kvcache/kv_store.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace tandem {

absl::Status ValidateTokenRange(const KvStoreLayout& layout, int32_t layer,
                                std::span<const BlockId> table, int64_t first_token, int64_t n) {
  if (layer < 0 || layer >= layout.geometry.num_layers) {
    return absl::OutOfRangeError(
        absl::StrCat("layer ", layer, " out of range [0, ", layout.geometry.num_layers, ")"));
  }
  if (first_token < 0 || n < 0) {
    return absl::OutOfRangeError("negative token range");
  }
  const int64_t capacity = static_cast<int64_t>(table.size()) * layout.block_size;
  if (first_token > capacity || n > capacity - first_token) {
    return absl::OutOfRangeError(absl::StrCat("tokens [", first_token, ", +", n,
                                              ") exceed the block table's ", capacity, " slots"));
  }
  if (n == 0) {
    return absl::OkStatus();
  }
  const int64_t first_block = first_token / layout.block_size;
  const int64_t last_block = (first_token + n - 1) / layout.block_size;
  for (int64_t b = first_block; b <= last_block; ++b) {
    if (table[b] < 0 || table[b] >= layout.num_blocks) {
      return absl::OutOfRangeError(absl::StrCat("block id ", table[b], " out of range"));
    }
  }
  return absl::OkStatus();
}

HostKvStore::HostKvStore(const KvStoreLayout& layout)
    : layout_(layout),
      block_bytes_(static_cast<size_t>(layout.block_size) * layout.geometry.token_elems() *
                   DTypeSize(layout.dtype)) {
  const size_t bytes = block_bytes_ * layout.num_blocks * layout.geometry.num_layers;
  // Value-initialised: a block never written reads as zeros, not as stale memory.
  k_ = std::make_unique<std::byte[]>(bytes);
  v_ = std::make_unique<std::byte[]>(bytes);
}

absl::Status HostKvStore::WriteTokens(int32_t layer, std::span<const BlockId> table,
                                      int64_t first_token, int64_t n, DType src, const void* k,
                                      const void* v) {
  if (absl::Status s = ValidateTokenRange(layout_, layer, table, first_token, n); !s.ok()) {
    return s;
  }
  const int64_t te = layout_.geometry.token_elems();
  const size_t src_tok_bytes = te * DTypeSize(src);
  const size_t dst_tok_bytes = te * DTypeSize(layout_.dtype);
  const auto* ks = static_cast<const std::byte*>(k);
  const auto* vs = static_cast<const std::byte*>(v);
  int64_t t = first_token;
  const int64_t end = first_token + n;
  while (t < end) {
    const BlockId b = table[t / layout_.block_size];
    const int64_t slot = t % layout_.block_size;
    const int64_t run = std::min<int64_t>(end - t, layout_.block_size - slot);
    const size_t src_off = (t - first_token) * src_tok_bytes;
    ConvertElements(src, ks + src_off, layout_.dtype, KBlock(layer, b) + slot * dst_tok_bytes,
                    run * te);
    ConvertElements(src, vs + src_off, layout_.dtype, VBlock(layer, b) + slot * dst_tok_bytes,
                    run * te);
    t += run;
  }
  return absl::OkStatus();
}

bool HostKvStore::InPlaceRegions(int32_t layer, std::span<const BlockId> table, int64_t first_token,
                                 int64_t n, DType src, std::vector<std::span<std::byte>>* out) {
  if (src != layout_.dtype || n <= 0 ||
      !ValidateTokenRange(layout_, layer, table, first_token, n).ok()) {
    return false;
  }
  const size_t tok_bytes = layout_.geometry.token_elems() * DTypeSize(layout_.dtype);
  for (const bool k_plane : {true, false}) {
    const size_t first_run = out->size();
    int64_t t = first_token;
    const int64_t end = first_token + n;
    while (t < end) {
      const BlockId b = table[t / layout_.block_size];
      const int64_t slot = t % layout_.block_size;
      const int64_t run = std::min<int64_t>(end - t, layout_.block_size - slot);
      std::byte* p = (k_plane ? KBlock(layer, b) : VBlock(layer, b)) + slot * tok_bytes;
      const size_t bytes = run * tok_bytes;
      // Consecutive block ids are adjacent in memory (same layer): extend the previous run.
      if (out->size() > first_run && out->back().data() + out->back().size() == p) {
        out->back() = std::span<std::byte>(out->back().data(), out->back().size() + bytes);
      } else {
        out->emplace_back(p, bytes);
      }
      t += run;
    }
  }
  return true;
}

absl::Status HostKvStore::ReadTokens(int32_t layer, std::span<const BlockId> table,
                                     int64_t first_token, int64_t n, DType dst, void* k,
                                     void* v) const {
  if (absl::Status s = ValidateTokenRange(layout_, layer, table, first_token, n); !s.ok()) {
    return s;
  }
  const int64_t te = layout_.geometry.token_elems();
  const size_t dst_tok_bytes = te * DTypeSize(dst);
  const size_t src_tok_bytes = te * DTypeSize(layout_.dtype);
  auto* kd = static_cast<std::byte*>(k);
  auto* vd = static_cast<std::byte*>(v);
  int64_t t = first_token;
  const int64_t end = first_token + n;
  while (t < end) {
    const BlockId b = table[t / layout_.block_size];
    const int64_t slot = t % layout_.block_size;
    const int64_t run = std::min<int64_t>(end - t, layout_.block_size - slot);
    const size_t dst_off = (t - first_token) * dst_tok_bytes;
    ConvertElements(layout_.dtype, KBlock(layer, b) + slot * src_tok_bytes, dst, kd + dst_off,
                    run * te);
    ConvertElements(layout_.dtype, VBlock(layer, b) + slot * src_tok_bytes, dst, vd + dst_off,
                    run * te);
    t += run;
  }
  return absl::OkStatus();
}

}  // namespace tandem
