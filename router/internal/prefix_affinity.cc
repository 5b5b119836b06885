// Prefix affinity record: see prefix_affinity.h.
#include "router/internal/prefix_affinity.h"

namespace tandem {

size_t PrefixAffinity::MatchedBlocks(std::span<const BlockHash> hashes) const {
  size_t n = 0;
  // Hashes are chained, so a block only counts when every block before it matched too.
  while (n < hashes.size() && present_.contains(hashes[n])) {
    ++n;
  }
  return n;
}

void PrefixAffinity::Record(std::span<const BlockHash> hashes) {
  if (capacity_ == 0) {
    return;
  }
  for (BlockHash h : hashes) {
    if (!present_.insert(h).second) {
      continue;
    }
    order_.push_back(h);
    if (order_.size() > capacity_) {
      present_.erase(order_.front());
      order_.pop_front();
    }
  }
}

}  // namespace tandem
