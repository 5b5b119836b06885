// Block pool accounting, reference counts and prefix cache.
#include "kvcache/block_pool.h"

#include <gtest/gtest.h>

namespace tandem {
namespace {

TEST(BlockPoolTest, AllocateIsAllOrNothing) {
  BlockPool pool(4, 16);
  auto a = pool.Allocate(3);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(pool.num_free_blocks(), 1);
  auto b = pool.Allocate(2);
  EXPECT_EQ(b.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(pool.num_free_blocks(), 1);
  pool.Release(*a);
  EXPECT_EQ(pool.num_free_blocks(), 4);
  EXPECT_EQ(pool.CheckInvariants(), "");
}

TEST(BlockPoolTest, BlockWithTwoHoldersFreesOnlyWhenBothRelease) {
  BlockPool pool(2, 4);
  auto a = pool.Allocate(1);
  ASSERT_TRUE(a.ok());
  const BlockId id = (*a)[0];
  pool.Retain(id);  // e.g. a data-plane writer
  pool.Release(id);  // the request lets go first
  EXPECT_EQ(pool.num_free_blocks(), 1);
  EXPECT_EQ(pool.RefCount(id), 1);
  pool.Release(id);
  EXPECT_EQ(pool.num_free_blocks(), 2);
  EXPECT_EQ(pool.CheckInvariants(), "");
}

TEST(BlockPoolTest, PrefixCacheHitAndLruEviction) {
  BlockPool pool(3, 2);
  const std::vector<int32_t> tokens = {1, 2, 3, 4, 5};
  const auto hashes = HashFullBlocks(tokens, 2, 7);
  ASSERT_EQ(hashes.size(), 2u);
  auto blocks = pool.Allocate(3);
  ASSERT_TRUE(blocks.ok());
  pool.Publish((*blocks)[0], hashes[0]);
  pool.Publish((*blocks)[1], hashes[1]);
  pool.Release(*blocks);
  EXPECT_EQ(pool.Stats().cached_blocks, 2);
  EXPECT_EQ(pool.num_free_blocks(), 3);

  auto hit = pool.MatchPrefix(hashes);
  ASSERT_EQ(hit.size(), 2u);
  EXPECT_EQ(hit[0], (*blocks)[0]);
  EXPECT_EQ(hit[1], (*blocks)[1]);
  EXPECT_EQ(pool.num_free_blocks(), 1);
  pool.Release(hit);

  // A different first block breaks the chain at once.
  const std::vector<int32_t> other = {9, 2, 3, 4};
  EXPECT_TRUE(pool.MatchPrefix(HashFullBlocks(other, 2, 7)).empty());

  // Allocating everything evicts the cached blocks, oldest first.
  auto all = pool.Allocate(3);
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(pool.Stats().evictions, 2);
  pool.Release(*all);
  EXPECT_TRUE(pool.MatchPrefix(hashes).empty());
  EXPECT_EQ(pool.CheckInvariants(), "");
  EXPECT_EQ(pool.num_free_blocks(), 3);
}

TEST(BlockPoolTest, HashChainDependsOnSeedAndEveryEarlierToken) {
  const std::vector<int32_t> a = {1, 2, 3, 4};
  const std::vector<int32_t> b = {1, 9, 3, 4};
  EXPECT_NE(HashFullBlocks(a, 2, 0)[1], HashFullBlocks(b, 2, 0)[1]);
  EXPECT_NE(HashFullBlocks(a, 2, 0)[0], HashFullBlocks(a, 2, 1)[0]);
  EXPECT_EQ(HashFullBlocks(a, 2, 0), HashFullBlocks(a, 2, 0));
}

}  // namespace
}  // namespace tandem
