// Block pool with reference counts and an LRU prefix cache.
#include "kvcache/block_pool.h"

#include <cstdio>
#include <cstdlib>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "xxhash.h"

namespace tandem {

BlockPool::BlockPool(int32_t num_blocks, int32_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  if (num_blocks <= 0 || block_size <= 0) {
    std::fprintf(stderr, "BlockPool: num_blocks and block_size must be positive\n");
    std::abort();
  }
  absl::MutexLock lock(&mu_);
  blocks_.resize(num_blocks);
  free_list_.reserve(num_blocks);
  for (int32_t i = num_blocks - 1; i >= 0; --i) {
    free_list_.push_back(i);
  }
}

void BlockPool::CheckId(BlockId id) const {
  if (id < 0 || id >= num_blocks_) {
    std::fprintf(stderr, "BlockPool: block id %d out of range [0, %d)\n", id, num_blocks_);
    std::abort();
  }
}

absl::StatusOr<std::vector<BlockId>> BlockPool::Allocate(int32_t n) {
  if (n < 0) {
    return absl::InvalidArgumentError("negative block count");
  }
  absl::MutexLock lock(&mu_);
  const int64_t available = static_cast<int64_t>(free_list_.size()) + lru_.size();
  if (n > available) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV pool exhausted: need ", n, " blocks, ", available, " free of ",
                     num_blocks_));
  }
  std::vector<BlockId> out;
  out.reserve(n);
  for (int32_t i = 0; i < n; ++i) {
    BlockId id;
    if (!free_list_.empty()) {
      id = free_list_.back();
      free_list_.pop_back();
    } else {
      id = lru_.front();
      lru_.pop_front();
      Block& b = blocks_[id];
      by_hash_.erase(b.hash);
      b.hashed = false;
      ++evictions_;
    }
    blocks_[id].refs = 1;
    out.push_back(id);
  }
  return out;
}

void BlockPool::Retain(BlockId id) {
  CheckId(id);
  absl::MutexLock lock(&mu_);
  Block& b = blocks_[id];
  if (b.refs == 0) {
    std::fprintf(stderr, "BlockPool: Retain of free block %d\n", id);
    std::abort();
  }
  ++b.refs;
}

void BlockPool::Retain(std::span<const BlockId> ids) {
  for (BlockId id : ids) Retain(id);
}

void BlockPool::ReleaseLocked(BlockId id) {
  Block& b = blocks_[id];
  if (b.refs <= 0) {
    std::fprintf(stderr, "BlockPool: double release of block %d\n", id);
    std::abort();
  }
  if (--b.refs > 0) {
    return;
  }
  if (b.hashed) {
    lru_.push_back(id);
    b.lru_pos = std::prev(lru_.end());
  } else {
    free_list_.push_back(id);
  }
}

void BlockPool::Release(BlockId id) {
  CheckId(id);
  absl::MutexLock lock(&mu_);
  ReleaseLocked(id);
}

void BlockPool::Release(std::span<const BlockId> ids) {
  for (BlockId id : ids) CheckId(id);
  absl::MutexLock lock(&mu_);
  for (BlockId id : ids) ReleaseLocked(id);
}

void BlockPool::Publish(BlockId id, BlockHash hash) {
  CheckId(id);
  absl::MutexLock lock(&mu_);
  Block& b = blocks_[id];
  if (b.refs == 0 || b.hashed || by_hash_.count(hash) != 0) {
    return;
  }
  b.hashed = true;
  b.hash = hash;
  by_hash_.emplace(hash, id);
}

std::vector<BlockId> BlockPool::MatchPrefix(std::span<const BlockHash> hashes) {
  absl::MutexLock lock(&mu_);
  std::vector<BlockId> out;
  prefix_queries_ += static_cast<int64_t>(hashes.size());
  for (BlockHash h : hashes) {
    auto it = by_hash_.find(h);
    if (it == by_hash_.end()) {
      break;
    }
    Block& b = blocks_[it->second];
    if (b.refs == 0) {
      lru_.erase(b.lru_pos);
    }
    ++b.refs;
    out.push_back(it->second);
  }
  prefix_hits_ += static_cast<int64_t>(out.size());
  return out;
}

BlockPoolStats BlockPool::Stats() const {
  absl::MutexLock lock(&mu_);
  BlockPoolStats s;
  s.total_blocks = num_blocks_;
  s.cached_blocks = static_cast<int64_t>(lru_.size());
  s.free_blocks = static_cast<int64_t>(free_list_.size()) + s.cached_blocks;
  s.used_blocks = num_blocks_ - s.free_blocks;
  s.prefix_queries = prefix_queries_;
  s.prefix_hits = prefix_hits_;
  s.evictions = evictions_;
  return s;
}

int32_t BlockPool::num_free_blocks() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int32_t>(free_list_.size() + lru_.size());
}

int32_t BlockPool::RefCount(BlockId id) const {
  CheckId(id);
  absl::MutexLock lock(&mu_);
  return blocks_[id].refs;
}

std::string BlockPool::CheckInvariants() const {
  absl::MutexLock lock(&mu_);
  std::vector<int> seen(num_blocks_, 0);
  for (BlockId id : free_list_) {
    if (blocks_[id].refs != 0 || blocks_[id].hashed) {
      return absl::StrCat("block ", id, " on the free list is referenced or hashed");
    }
    ++seen[id];
  }
  for (BlockId id : lru_) {
    if (blocks_[id].refs != 0 || !blocks_[id].hashed) {
      return absl::StrCat("block ", id, " on the LRU list is referenced or not hashed");
    }
    ++seen[id];
  }
  int64_t used = 0;
  for (int32_t id = 0; id < num_blocks_; ++id) {
    if (blocks_[id].refs > 0) {
      ++used;
      ++seen[id];
    }
    if (seen[id] != 1) {
      return absl::StrCat("block ", id, " is in ", seen[id], " states");
    }
  }
  if (used + static_cast<int64_t>(free_list_.size() + lru_.size()) != num_blocks_) {
    return "free + used != total";
  }
  return "";
}

std::vector<BlockHash> HashFullBlocks(std::span<const int32_t> tokens, int32_t block_size,
                                      uint64_t seed) {
  std::vector<BlockHash> out;
  if (block_size <= 0) {
    return out;
  }
  const size_t full = tokens.size() / static_cast<size_t>(block_size);
  out.reserve(full);
  BlockHash parent = seed;
  for (size_t i = 0; i < full; ++i) {
    parent = HashBlock(parent, tokens.subspan(i * block_size, block_size));
    out.push_back(parent);
  }
  return out;
}

BlockHash HashBlock(BlockHash parent, std::span<const int32_t> block_tokens) {
  return XXH3_64bits_withSeed(block_tokens.data(), block_tokens.size() * sizeof(int32_t), parent);
}

}  // namespace tandem
