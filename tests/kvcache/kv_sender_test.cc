// Sender-side helpers shared by the transports: how a slice is cut into LAYER frames.
#include "kvcache/kv_sender.h"

#include <gtest/gtest.h>

#include <vector>

namespace tandem {
namespace {

TEST(ForEachLayerFrameTest, SplitsByPayloadAndComputesOrDefersTheChecksum) {
  constexpr uint64_t kTokenBytes = 64;
  std::vector<std::byte> k(10 * kTokenBytes), v(10 * kTokenBytes);
  for (size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<std::byte>(i);
    v[i] = static_cast<std::byte>(i * 3);
  }
  LayerSlice slice;
  slice.layer = 1;
  slice.first_token = 4;
  slice.token_count = 10;
  slice.k = k.data();
  slice.v = v.data();
  for (auto mode : {internal::FrameChecksum::kCompute, internal::FrameChecksum::kDeferred}) {
    std::vector<LayerFrame> frames;
    // 3 tokens of K+V per frame: frames of 3, 3, 3 and 1 tokens.
    EXPECT_TRUE(internal::ForEachLayerFrame(9, slice, kTokenBytes, 3 * 2 * kTokenBytes + 5, mode,
                                            [&](const LayerFrame& f) {
                                              frames.push_back(f);
                                              return true;
                                            }));
    ASSERT_EQ(frames.size(), 4u);
    uint64_t next = 4;
    for (const LayerFrame& f : frames) {
      EXPECT_EQ(f.transfer_id, 9u);
      EXPECT_EQ(f.layer, 1u);
      EXPECT_EQ(f.first_token, next);
      EXPECT_EQ(f.k.data(), k.data() + (next - 4) * kTokenBytes);
      EXPECT_EQ(f.v.size(), f.token_count * kTokenBytes);
      EXPECT_EQ(f.checksum,
                mode == internal::FrameChecksum::kCompute ? LayerChecksum(f.k, f.v) : 0u);
      next += f.token_count;
    }
    EXPECT_EQ(next, 14u);
  }
  // The overload without a mode computes it, as it always did.
  int calls = 0;
  EXPECT_FALSE(internal::ForEachLayerFrame(9, slice, kTokenBytes, 1, [&](const LayerFrame& f) {
    EXPECT_EQ(f.checksum, LayerChecksum(f.k, f.v));
    return ++calls < 2;  // stops early
  }));
  EXPECT_EQ(calls, 2);
}

}  // namespace
}  // namespace tandem
