// A bounded record of the prompt blocks recently routed to one prefill worker, used to estimate
// how much of a new prompt that worker's prefix cache may already hold. An estimate only: the
// worker's cache may have evicted a block the record still lists.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <span>
#include <unordered_set>

#include "kvcache/block_pool.h"

namespace tandem {

// Prompts are hashed in blocks of this many tokens for affinity, whatever the workers' own
// block sizes are.
inline constexpr int32_t kAffinityBlockTokens = 16;

class PrefixAffinity {
 public:
  explicit PrefixAffinity(size_t capacity_blocks) : capacity_(capacity_blocks) {}

  // Number of leading `hashes` (chained block hashes of a prompt) in the record.
  size_t MatchedBlocks(std::span<const BlockHash> hashes) const;
  // Adds the hashes; the oldest entries leave once the record holds `capacity` blocks.
  void Record(std::span<const BlockHash> hashes);
  size_t size() const { return order_.size(); }

 private:
  size_t capacity_;
  std::unordered_set<BlockHash> present_;
  std::deque<BlockHash> order_;  // insertion order: front = oldest
};

}  // namespace tandem
