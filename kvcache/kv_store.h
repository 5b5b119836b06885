// Paged KV memory: where a pool's blocks physically live, and conversion from/to the canonical
// (wire) layout.
//
// Canonical layout of one layer's K (and likewise V) for a token range:
// [tokens][kv_heads][head_dim], little-endian, elements of a tagged dtype. Paged layout of a store:
// per layer, per block, [block_size][kv_heads][head_dim]. Token t of a sequence lives in block
// table[t / block_size] at slot t % block_size.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "kvcache/block_pool.h"
#include "kvcache/dtype.h"

namespace tandem {

struct KvGeometry {
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  // Elements of one token's K (or V) in one layer.
  int64_t token_elems() const { return static_cast<int64_t>(num_kv_heads) * head_dim; }
  bool operator==(const KvGeometry&) const = default;
};

struct KvStoreLayout {
  KvGeometry geometry;
  int32_t block_size = 16;
  DType dtype = DType::kF32;
  int32_t num_blocks = 0;
};

// Interface shared by host and device stores (the device ones stage through host memory).
class KvStore {
 public:
  virtual ~KvStore() = default;
  virtual const KvStoreLayout& layout() const = 0;

  // Writes tokens [first_token, first_token + n) of one layer of a sequence, given in canonical
  // layout and `src` dtype, into the blocks of `table`, converting dtype. Validates every index
  // before copying: the table must cover the range and every block id must be in range.
  virtual absl::Status WriteTokens(int32_t layer, std::span<const BlockId> table,
                                   int64_t first_token, int64_t n, DType src, const void* k,
                                   const void* v) = 0;
  // Reads the same range out into canonical layout in `dst` dtype.
  virtual absl::Status ReadTokens(int32_t layer, std::span<const BlockId> table,
                                  int64_t first_token, int64_t n, DType dst, void* k,
                                  void* v) const = 0;

  // For writers that fill a token range in place (a transport reading a payload straight from
  // its socket) instead of handing a finished buffer to WriteTokens: appends to `out` the host
  // memory that tokens [first_token, first_token + n) of `layer` occupy, as the canonical
  // payload K || V maps onto it: first the runs of K slots in token order, then those of V. Bytes
  // copied into these spans in order land exactly as WriteTokens(..., src, k, v) would put them.
  // Possible only when the store holds `src` dtype in host memory; returns false otherwise (or
  // when the range is invalid), leaving `out` unchanged: stage the bytes and call WriteTokens.
  // The spans stay valid as long as the store.
  virtual bool InPlaceRegions(int32_t /*layer*/, std::span<const BlockId> /*table*/,
                              int64_t /*first_token*/, int64_t /*n*/, DType /*src*/,
                              std::vector<std::span<std::byte>>* /*out*/) {
    return false;
  }
};

// Checks that `table` covers tokens [first_token, first_token+n) and that its ids are valid for a
// store of `layout`.
absl::Status ValidateTokenRange(const KvStoreLayout& layout, int32_t layer,
                                std::span<const BlockId> table, int64_t first_token, int64_t n);

// KV blocks in host memory. The CPU backend attends over it directly.
class HostKvStore final : public KvStore {
 public:
  explicit HostKvStore(const KvStoreLayout& layout);

  const KvStoreLayout& layout() const override { return layout_; }
  absl::Status WriteTokens(int32_t layer, std::span<const BlockId> table, int64_t first_token,
                           int64_t n, DType src, const void* k, const void* v) override;
  absl::Status ReadTokens(int32_t layer, std::span<const BlockId> table, int64_t first_token,
                          int64_t n, DType dst, void* k, void* v) const override;
  // Runs of consecutive block ids are merged into one span.
  bool InPlaceRegions(int32_t layer, std::span<const BlockId> table, int64_t first_token, int64_t n,
                      DType src, std::vector<std::span<std::byte>>* out) override;

  // Start of one block of one layer: [block_size][kv_heads][head_dim] elements of layout().dtype.
  std::byte* KBlock(int32_t layer, BlockId block) { return k_.get() + Offset(layer, block); }
  std::byte* VBlock(int32_t layer, BlockId block) { return v_.get() + Offset(layer, block); }
  const std::byte* KBlock(int32_t layer, BlockId block) const {
    return k_.get() + Offset(layer, block);
  }
  const std::byte* VBlock(int32_t layer, BlockId block) const {
    return v_.get() + Offset(layer, block);
  }
  size_t block_bytes() const { return block_bytes_; }
  size_t total_bytes() const {
    return 2 * block_bytes_ * layout_.num_blocks * layout_.geometry.num_layers;
  }

 private:
  size_t Offset(int32_t layer, BlockId block) const {
    return (static_cast<size_t>(layer) * layout_.num_blocks + block) * block_bytes_;
  }

  KvStoreLayout layout_;
  size_t block_bytes_;
  std::unique_ptr<std::byte[]> k_;
  std::unique_ptr<std::byte[]> v_;
};

}  // namespace tandem
