// Paged KV block pool: fixed-size blocks, reference counts, and a prefix cache over full blocks.
//
// Ownership rule (DESIGN §9): a block returns to the pool only when every holder has released it.
// A sequence holds one reference; a data-plane writer that may still write into a block holds
// another. A released block whose content was published under a prefix hash stays cached
// (evictable, LRU) and counts as free: allocation evicts the least recently used cached block.
//
// Thread-safe: the engine loop and the KV receiver share one pool.
#pragma once

#include <cstdint>
#include <list>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace tandem {

using BlockId = int32_t;
using BlockHash = uint64_t;

struct BlockPoolStats {
  int64_t total_blocks = 0;
  int64_t free_blocks = 0;    // allocatable now: never used + cached-evictable
  int64_t used_blocks = 0;    // referenced by at least one holder
  int64_t cached_blocks = 0;  // unreferenced but holding a published prefix (subset of free)
  int64_t prefix_queries = 0;      // blocks looked up by MatchPrefix
  int64_t prefix_hits = 0;         // blocks found by MatchPrefix
  int64_t evictions = 0;
};

class BlockPool {
 public:
  BlockPool(int32_t num_blocks, int32_t block_size);
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  int32_t block_size() const { return block_size_; }
  int32_t num_blocks() const { return num_blocks_; }

  // All-or-nothing: n fresh blocks, each with one reference, or RESOURCE_EXHAUSTED and no change.
  absl::StatusOr<std::vector<BlockId>> Allocate(int32_t n);
  // Adds a holder to an allocated block.
  void Retain(BlockId id);
  void Retain(std::span<const BlockId> ids);
  // Drops a holder; at zero the block becomes free (or cached if it was published).
  void Release(BlockId id);
  void Release(std::span<const BlockId> ids);

  // Records that a full, referenced block holds the KV of the prefix whose chained hash is `hash`.
  // A block already published under another hash, or a hash already held by another block, is
  // left as it is (first writer wins).
  void Publish(BlockId id, BlockHash hash);
  // Longest run of leading hashes that are cached; each returned block gains one reference.
  std::vector<BlockId> MatchPrefix(std::span<const BlockHash> hashes);

  BlockPoolStats Stats() const;
  int32_t num_free_blocks() const;
  int32_t RefCount(BlockId id) const;
  // free + used == total, and every block is in exactly one state. Returns a description of the
  // first violation, or "" when consistent.
  std::string CheckInvariants() const;

 private:
  struct Block {
    int32_t refs = 0;
    bool hashed = false;
    BlockHash hash = 0;
    std::list<BlockId>::iterator lru_pos;  // valid iff refs == 0 && hashed
  };

  void ReleaseLocked(BlockId id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CheckId(BlockId id) const;

  const int32_t num_blocks_;
  const int32_t block_size_;
  mutable absl::Mutex mu_;
  std::vector<Block> blocks_ ABSL_GUARDED_BY(mu_);
  std::vector<BlockId> free_list_ ABSL_GUARDED_BY(mu_);  // never-hashed free blocks (stack)
  std::list<BlockId> lru_ ABSL_GUARDED_BY(mu_);          // cached, unreferenced: front = oldest
  std::unordered_map<BlockHash, BlockId> by_hash_ ABSL_GUARDED_BY(mu_);
  int64_t prefix_queries_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t prefix_hits_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t evictions_ ABSL_GUARDED_BY(mu_) = 0;
};

// Hash of one block's tokens chained onto the hash of everything before it (`parent`; the seed
// for the first block).
BlockHash HashBlock(BlockHash parent, std::span<const int32_t> block_tokens);

// Chained hash of full blocks of a token sequence: hash[i] covers tokens [0, (i+1)*block_size).
// `seed` separates caches that must not share content (e.g. different models or KV dtypes).
std::vector<BlockHash> HashFullBlocks(std::span<const int32_t> tokens, int32_t block_size,
                                      uint64_t seed);

}  // namespace tandem
