// KV transfers over loopback TCP: every dtype pair, several block sizes and token counts, many
// transfers multiplexed on one connection, backpressure, bit-exact landing.
#include <gtest/gtest.h>

#include <thread>

#include "tests/kvcache/transport/tcp_fixture.h"

namespace tandem {
namespace {

using testing::AckCollector;
using testing::Expect;
using testing::Expectation;
using testing::ExpectLanded;
using testing::MakeClient;
using testing::MakePayload;
using testing::Payload;
using testing::SenderSpec;
using testing::StreamPayload;
using testing::TcpReceiver;

struct DTypePair {
  DType src;
  DType dst;
};

class TcpRoundTripTest : public ::testing::TestWithParam<DTypePair> {};

TEST_P(TcpRoundTripTest, BlockSizesAndTokenCountsLandBitExact) {
  const auto [src, dst] = GetParam();
  const KvGeometry g{3, 2, 8};
  for (int32_t bs : {16, 32}) {
    TcpReceiver rx(g, bs, dst, 64);
    KvClientOptions co;
    co.max_frame_payload_bytes = 2048;  // several frames per layer
    auto client = MakeClient(co);
    AckCollector acks;
    uint64_t id = 1;
    for (int64_t tokens : {int64_t{1}, int64_t{bs - 1}, int64_t{bs}, int64_t{bs + 1}}) {
      for (int64_t start : {int64_t{0}, int64_t{3}}) {
        Expectation e = Expect(rx.r, id, tokens, start);
        const Payload p = MakePayload(g, tokens, src, static_cast<uint32_t>(id));
        auto t = client->Begin(SenderSpec(rx.r, e, tokens, src, rx.address()), acks.Callback());
        ASSERT_TRUE(t.ok()) << t.status();
        StreamPayload(**t, p, /*slice_tokens=*/(tokens + 1) / 2);
        auto ack = acks.Wait(id);
        ASSERT_TRUE(ack && ack->status.ok()) << (ack ? ack->status : absl::UnknownError("none"));
        LandingOutcome o = e.Wait();
        ASSERT_TRUE(o.status.ok()) << o.status;
        EXPECT_EQ(o.first_token, 7);
        ExpectLanded(rx.r, e, p);
        rx.r.pool.Release(e.table);
        ++id;
      }
    }
    EXPECT_TRUE(rx.r.AllFree());
    EXPECT_EQ(client->connection_count(rx.address()), 1u);
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllPairs, TcpRoundTripTest,
    ::testing::Values(DTypePair{DType::kF32, DType::kF32}, DTypePair{DType::kF32, DType::kF16},
                      DTypePair{DType::kF32, DType::kBF16}, DTypePair{DType::kF16, DType::kF32},
                      DTypePair{DType::kF16, DType::kF16}, DTypePair{DType::kF16, DType::kBF16},
                      DTypePair{DType::kBF16, DType::kF32}, DTypePair{DType::kBF16, DType::kF16},
                      DTypePair{DType::kBF16, DType::kBF16}),
    [](const auto& info) {
      return std::string(DTypeName(info.param.src)) + "_to_" +
             std::string(DTypeName(info.param.dst));
    });

TEST(TcpTransportTest, Bf16Block16SenderFeedsFp32Block32ReceiverWith4096Tokens) {
  const KvGeometry g{4, 2, 16};
  const int64_t tokens = 4096;
  TcpReceiver rx(g, 32, DType::kF32, 4096 / 32 + 1);
  auto client = MakeClient();
  AckCollector acks;
  Expectation e = Expect(rx.r, 1, tokens);
  const Payload p = MakePayload(g, tokens, DType::kBF16, 42);
  auto t = client->Begin(SenderSpec(rx.r, e, tokens, DType::kBF16, rx.address()), acks.Callback());
  ASSERT_TRUE(t.ok());
  StreamPayload(**t, p, /*slice_tokens=*/16);  // a block-16 sender's chunks
  ASSERT_TRUE(acks.Wait(1)->status.ok());
  ASSERT_TRUE(e.Wait().status.ok());
  ExpectLanded(rx.r, e, p);
  rx.r.pool.Release(e.table);
  EXPECT_TRUE(rx.r.AllFree());
}

// 16 MiB LAYER frames, read straight into the store over many reads (and turns of the I/O
// thread), while a second connection's small transfer is served in between.
TEST(TcpTransportTest, LargeFramesLandInPlaceWithoutStarvingOtherConnections) {
  const KvGeometry g{2, 8, 128};
  const int64_t tokens = 2048;  // 4 KiB per token of K in f32: 8 MiB of K per layer
  TcpReceiver rx(g, 16, DType::kF32, 2 * (tokens / 16) + 1);
  KvClientOptions big;
  big.max_frame_payload_bytes = 64u << 20;
  big.max_inflight_bytes = 64u << 20;
  auto client = MakeClient(big);
  auto other = MakeClient();
  AckCollector acks;
  Expectation e = Expect(rx.r, 1, tokens);
  Expectation small = Expect(rx.r, 2, 16);
  const Payload p = MakePayload(g, tokens, DType::kF32, 8);
  const Payload q = MakePayload(g, 16, DType::kF32, 9);
  auto t = client->Begin(SenderSpec(rx.r, e, tokens, DType::kF32, rx.address()), acks.Callback());
  ASSERT_TRUE(t.ok());
  auto u = other->Begin(SenderSpec(rx.r, small, 16, DType::kF32, rx.address()), acks.Callback());
  ASSERT_TRUE(u.ok());
  std::thread small_sender([&] { StreamPayload(**u, q); });
  StreamPayload(**t, p);  // one 16 MiB frame per layer
  small_sender.join();
  ASSERT_TRUE(acks.Wait(1)->status.ok());
  ASSERT_TRUE(acks.Wait(2)->status.ok());
  ASSERT_TRUE(e.Wait().status.ok());
  ASSERT_TRUE(small.Wait().status.ok());
  ExpectLanded(rx.r, e, p);
  ExpectLanded(rx.r, small, q);
  rx.r.pool.Release(e.table);
  rx.r.pool.Release(small.table);
  EXPECT_TRUE(rx.r.AllFree());
}

TEST(TcpTransportTest, ManyConcurrentTransfersShareOneConnection) {
  const KvGeometry g{4, 2, 8};
  constexpr int kThreads = 8;
  constexpr int kPerThread = 6;
  TcpReceiver rx(g, 16, DType::kBF16, 800);
  KvClientOptions co;
  co.connections_per_peer = 1;
  co.max_frame_payload_bytes = 1024;
  co.max_inflight_bytes = 64 << 10;  // small: backpressure engages
  auto client = MakeClient(co);
  AckCollector acks;
  std::vector<Expectation> es;
  std::vector<Payload> ps;
  for (int i = 0; i < kThreads * kPerThread; ++i) {
    const int64_t tokens = 17 + 7 * i;
    es.push_back(Expect(rx.r, 1000 + i, tokens));
    ps.push_back(MakePayload(g, tokens, DType::kBF16, static_cast<uint32_t>(i)));
  }
  std::vector<std::thread> threads;
  for (int th = 0; th < kThreads; ++th) {
    threads.emplace_back([&, th] {
      // Each thread interleaves its transfers layer by layer, as a batched prefill would.
      std::vector<std::unique_ptr<OutgoingTransfer>> ts;
      for (int j = 0; j < kPerThread; ++j) {
        const int i = th * kPerThread + j;
        auto t = client->Begin(SenderSpec(rx.r, es[i], ps[i].tokens, DType::kBF16, rx.address()),
                               acks.Callback());
        ASSERT_TRUE(t.ok()) << t.status();
        ts.push_back(std::move(*t));
      }
      for (int l = 0; l < g.num_layers; ++l) {
        for (int j = 0; j < kPerThread; ++j) {
          const Payload& p = ps[th * kPerThread + j];
          ASSERT_TRUE(
              ts[j]->SendLayer(l, p.layers[l].k.data(), p.layers[l].v.data(), DType::kBF16).ok());
        }
      }
      for (auto& t : ts) ASSERT_TRUE(t->Finish(1, 0.0f).ok());
      for (auto& t : ts) {
        auto ack = acks.Wait(t->transfer_id());
        ASSERT_TRUE(ack && ack->status.ok());
      }
    });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < es.size(); ++i) {
    ASSERT_TRUE(es[i].Wait().status.ok());
    ExpectLanded(rx.r, es[i], ps[i]);
    rx.r.pool.Release(es[i].table);
  }
  EXPECT_TRUE(rx.r.AllFree());
  EXPECT_EQ(client->connection_count(rx.address()), 1u);
  EXPECT_EQ(rx.server->connection_count(), 1u);
  EXPECT_EQ(rx.r.landing.Stats().transfers_ok, es.size());
}

TEST(TcpTransportTest, KeepAliveIsReleasedOnceWritten) {
  const KvGeometry g{2, 2, 8};
  TcpReceiver rx(g, 16, DType::kF32, 8);
  auto client = MakeClient();
  AckCollector acks;
  Expectation e = Expect(rx.r, 1, 40);
  const Payload p = MakePayload(g, 40, DType::kF32, 1);
  auto t = client->Begin(SenderSpec(rx.r, e, 40, DType::kF32, rx.address()), acks.Callback());
  ASSERT_TRUE(t.ok());
  std::weak_ptr<const void> watch;
  for (int l = 0; l < 2; ++l) {
    // The layer's staging buffer lives exactly as long as the sender needs it.
    auto staging = std::make_shared<Payload>(p);
    if (l == 0) watch = staging;
    ASSERT_TRUE((*t)->SendLayer(l, staging->layers[l].k.data(), staging->layers[l].v.data(),
                                DType::kF32, staging)
                    .ok());
  }
  ASSERT_TRUE((*t)->Finish(1, 0.0f).ok());
  ASSERT_TRUE(acks.Wait(1)->status.ok());
  EXPECT_TRUE(watch.expired());
  ASSERT_TRUE(e.Wait().status.ok());
  ExpectLanded(rx.r, e, p);
  rx.r.pool.Release(e.table);
  EXPECT_TRUE(rx.r.AllFree());
}

}  // namespace
}  // namespace tandem
