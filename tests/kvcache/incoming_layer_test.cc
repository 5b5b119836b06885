// KvLanding's in-place LAYER path (BeginLayer / IncomingLayer / FinishLayer): payloads delivered
// in awkward pieces land bit-exact, corrupt payloads fail their whole transfer and free its
// blocks, and a transfer that ends mid-payload stops the writes and lets its blocks go.
#include <gtest/gtest.h>

#include <array>
#include <cstring>

#include "kvcache/kv_landing.h"
#include "tests/kvcache/kv_test_util.h"

namespace tandem {
namespace {

using testing::Expect;
using testing::Expectation;
using testing::ExpectLanded;
using testing::kFingerprint;
using testing::MakePayload;
using testing::Payload;
using testing::Receiver;

const KvGeometry kSmall{2, 2, 8};

class RecordingSink : public ResultSink {
 public:
  void SendResult(const ResultFrame& f) override {
    absl::MutexLock lock(&mu_);
    results_.emplace_back(f.transfer_id, f.reason);
  }
  std::optional<TransferError> For(uint64_t id) {
    absl::MutexLock lock(&mu_);
    for (auto& [i, r] : results_) {
      if (i == id) return r;
    }
    return std::nullopt;
  }

 private:
  absl::Mutex mu_;
  std::vector<std::pair<uint64_t, TransferError>> results_ ABSL_GUARDED_BY(mu_);
};

// An encoded LAYER frame (header + body) of tokens [first, first + n) of `layer` of `p`.
std::vector<std::byte> LayerBytes(uint64_t id, const Payload& p, uint32_t layer, uint64_t first,
                                  uint32_t n) {
  const uint64_t tb = p.token_bytes();
  LayerFrame f;
  f.transfer_id = id;
  f.layer = layer;
  f.first_token = first;
  f.token_count = n;
  f.k = std::span<const std::byte>(p.layers[layer].k).subspan(first * tb, n * tb);
  f.v = std::span<const std::byte>(p.layers[layer].v).subspan(first * tb, n * tb);
  f.checksum = LayerChecksum(f.k, f.v);
  std::vector<std::byte> out(EncodedSize(f));
  Encode(f, out);
  return out;
}

// Plays a transport: the fixed part, then the payload in pieces whose sizes cycle through
// `pieces` (each piece spread over at most `max_spans` spans, as a socket read would be).
class FakeTransport {
 public:
  FakeTransport(KvLanding& landing, std::vector<size_t> pieces, size_t max_spans = 64)
      : landing_(landing),
        sink_(std::make_shared<RecordingSink>()),
        pieces_(std::move(pieces)),
        max_spans_(max_spans) {
    peer_ = landing_.AttachPeer(sink_);
  }

  void Begin(const Expectation& e, int64_t tokens, DType dtype) {
    BeginFrame b;
    b.transfer_id = e.id;
    b.token = e.token;
    b.model_fingerprint = kFingerprint;
    b.geometry = kSmall;
    b.dtype = dtype;
    b.token_count = static_cast<uint64_t>(tokens);
    b.start_position = static_cast<uint64_t>(e.start);
    EXPECT_TRUE(landing_.OnFrame(peer_, Frame(b)).ok());
  }

  // Starts a frame: header checks and BeginLayer. Returns the bytes of the payload.
  std::span<const std::byte> Start(const std::vector<std::byte>& frame) {
    auto h = DecodeFrameHeader(frame, kDefaultMaxFrameBytes);
    EXPECT_TRUE(h.ok());
    landing_.BeginLayer(peer_, std::span<const std::byte>(frame).subspan(kFrameHeaderBytes),
                        h->body_bytes, &layer_);
    next_piece_ = 0;
    return std::span<const std::byte>(frame).subspan(kLayerPrefixBytes);
  }

  // Delivers payload bytes [layer_.received_bytes(), upto) in pieces. Returns false when the
  // landing refused a write (transfer ended).
  bool Deliver(std::span<const std::byte> payload, uint64_t upto) {
    while (layer_.received_bytes() < upto) {
      if (!landing_.AcquireLayerWrite(&layer_)) return false;
      const size_t want = std::min<uint64_t>(pieces_[next_piece_++ % pieces_.size()],
                                             upto - layer_.received_bytes());
      std::array<std::span<std::byte>, 64> spans;
      const size_t n = layer_.NextBuffers(std::span(spans).first(max_spans_), want);
      size_t got = 0;
      for (size_t i = 0; i < n; ++i) {
        std::memcpy(spans[i].data(), payload.data() + layer_.received_bytes() + got,
                    spans[i].size());
        got += spans[i].size();
      }
      EXPECT_GT(got, 0u);
      layer_.Received(got);
      landing_.ReleaseLayerWrite(&layer_);
    }
    return true;
  }

  // A whole frame, the way a transport handles it.
  void Send(const std::vector<std::byte>& frame) {
    std::span<const std::byte> payload = Start(frame);
    if (layer_.mode() != IncomingLayer::Mode::kDiscard) {
      Deliver(payload, payload.size());
    }
    landing_.FinishLayer(&layer_);
  }

  void End(uint64_t id) {
    EXPECT_TRUE(landing_.OnFrame(peer_, Frame(EndFrame{id, 5, -1.0f})).ok());
  }

  IncomingLayer& layer() { return layer_; }
  RecordingSink& sink() { return *sink_; }
  PeerId peer() const { return peer_; }

 private:
  KvLanding& landing_;
  std::shared_ptr<RecordingSink> sink_;
  PeerId peer_ = 0;
  IncomingLayer layer_;
  std::vector<size_t> pieces_;
  size_t max_spans_;
  size_t next_piece_ = 0;
};

// Piece sizes that split the payload at odd offsets: inside elements, across block runs and
// across the K/V boundary.
const std::vector<size_t> kAwkward = {1, 13, 4099, 7, 333};

struct Case {
  DType src;
  DType store;
  int32_t block_size;
  int64_t start;
  size_t max_spans;
};

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  const auto& c = info.param;
  return std::string(DTypeName(c.src)) + "_to_" + std::string(DTypeName(c.store)) + "_bs" +
         std::to_string(c.block_size) + "_s" + std::to_string(c.start) + "_spans" +
         std::to_string(c.max_spans);
}

class IncomingLayerTest : public ::testing::TestWithParam<Case> {};

TEST_P(IncomingLayerTest, AwkwardPiecesLandBitExact) {
  const Case c = GetParam();
  Receiver r(kSmall, c.block_size, c.store, 32);
  constexpr int64_t kTokens = 37;
  Expectation e = Expect(r, 1, kTokens, c.start);
  const Payload p = MakePayload(kSmall, kTokens, c.src, 11);
  FakeTransport tx(r.landing, kAwkward, c.max_spans);
  tx.Begin(e, kTokens, c.src);
  // Layer 0 in three frames (5, 1 and 31 tokens), layer 1 in one.
  for (auto [first, n] : {std::pair<uint64_t, uint32_t>{0, 5}, {5, 1}, {6, 31}}) {
    const auto frame = LayerBytes(e.id, p, 0, first, n);
    std::span<const std::byte> payload = tx.Start(frame);
    EXPECT_EQ(tx.layer().mode(),
              c.src == c.store ? IncomingLayer::Mode::kInPlace : IncomingLayer::Mode::kStaged);
    ASSERT_TRUE(tx.Deliver(payload, payload.size()));
    r.landing.FinishLayer(&tx.layer());
    EXPECT_EQ(tx.layer().mode(), IncomingLayer::Mode::kIdle);
  }
  tx.Send(LayerBytes(e.id, p, 1, 0, kTokens));
  tx.End(e.id);
  LandingOutcome o = e.Wait();
  ASSERT_TRUE(o.status.ok()) << o.status;
  EXPECT_EQ(o.bytes_received, 2 * 2 * kTokens * p.token_bytes());
  ExpectLanded(r, e, p);
  r.pool.Release(e.table);
  EXPECT_TRUE(r.AllFree());
}

TEST_P(IncomingLayerTest, CorruptPayloadFailsTheWholeTransferAndFreesItsBlocks) {
  const Case c = GetParam();
  Receiver r(kSmall, c.block_size, c.store, 32);
  constexpr int64_t kTokens = 37;
  Expectation bad = Expect(r, 1, kTokens, c.start);
  Expectation good = Expect(r, 2, kTokens, c.start);
  const Payload p = MakePayload(kSmall, kTokens, c.src, 12);
  FakeTransport tx(r.landing, kAwkward, c.max_spans);
  tx.Begin(bad, kTokens, c.src);
  tx.Begin(good, kTokens, c.src);
  tx.Send(LayerBytes(bad.id, p, 0, 0, kTokens));  // verified and written
  tx.Send(LayerBytes(good.id, p, 0, 0, kTokens));
  // One flipped bit in V, at an odd offset: K verifies, the frame as a whole does not.
  auto frame = LayerBytes(bad.id, p, 1, 0, kTokens);
  frame[kLayerPrefixBytes + kTokens * p.token_bytes() * 3 / 2 + 3] ^= std::byte{0x20};
  tx.Send(frame);
  LandingOutcome o = bad.Wait();
  EXPECT_EQ(o.reason, TransferError::kChecksumMismatch) << o.status;
  EXPECT_TRUE(o.block_table.empty()) << "a failed transfer hands out no blocks";
  EXPECT_EQ(tx.sink().For(bad.id), TransferError::kChecksumMismatch);
  // Its END comes too late: the transfer stays failed, nothing is committed.
  tx.End(bad.id);
  // The landing let go of the failed transfer's blocks; only the caller's reference remains.
  for (BlockId b : bad.table) EXPECT_EQ(r.pool.RefCount(b), 1);

  tx.Send(LayerBytes(good.id, p, 1, 0, kTokens));
  tx.End(good.id);
  ASSERT_TRUE(good.Wait().status.ok());
  ExpectLanded(r, good, p);
  const LandingStats s = r.landing.Stats();
  EXPECT_EQ(s.failed_by_reason[static_cast<int>(TransferError::kChecksumMismatch)], 1u);
  EXPECT_EQ(s.transfers_ok, 1u);
  EXPECT_EQ(s.active_transfers, 0u);
  // Verified bytes only: the good transfer's 2 layers and the bad one's layer 0.
  EXPECT_EQ(s.bytes_received, 3 * 2 * kTokens * p.token_bytes());
  r.pool.Release(bad.table);
  r.pool.Release(good.table);
  EXPECT_TRUE(r.AllFree());
}

INSTANTIATE_TEST_SUITE_P(
    Matrix, IncomingLayerTest,
    ::testing::Values(Case{DType::kF32, DType::kF32, 16, 0, 64},   // in place
                      Case{DType::kBF16, DType::kBF16, 4, 3, 64},  // in place, many runs
                      Case{DType::kF16, DType::kF16, 8, 5, 1},     // in place, one span per read
                      Case{DType::kF32, DType::kBF16, 16, 3, 2},   // staged (conversion)
                      Case{DType::kBF16, DType::kF32, 4, 0, 64}),  // staged
    CaseName);

// A transfer that ends mid-payload: no more writes, and its blocks go back at once even though
// the frame never completes (a stalled peer holds nothing).
TEST(IncomingLayerLifecycleTest, CancelMidPayloadStopsWritesAndReleasesAtOnce) {
  Receiver r(kSmall, 16, DType::kF32, 8);
  Expectation e = Expect(r, 1, 20);
  const Payload p = MakePayload(kSmall, 20, DType::kF32, 1);
  FakeTransport tx(r.landing, {1000});
  tx.Begin(e, 20, DType::kF32);
  const auto frame = LayerBytes(e.id, p, 0, 0, 20);
  std::span<const std::byte> payload = tx.Start(frame);
  ASSERT_EQ(tx.layer().mode(), IncomingLayer::Mode::kInPlace);
  ASSERT_TRUE(tx.Deliver(payload, payload.size() / 2));
  EXPECT_TRUE(r.landing.Cancel(e.id));
  EXPECT_EQ(e.Wait().reason, TransferError::kCancelledByReceiver);
  r.pool.Release(e.table);
  EXPECT_TRUE(r.AllFree()) << "no write was in progress: the blocks are back";
  EXPECT_FALSE(r.landing.AcquireLayerWrite(&tx.layer()));
  r.landing.AbandonLayer(&tx.layer(), TransferError::kCancelledByReceiver, "test");
  EXPECT_EQ(tx.layer().mode(), IncomingLayer::Mode::kIdle);
  EXPECT_EQ(
      r.landing.Stats().failed_by_reason[static_cast<int>(TransferError::kCancelledByReceiver)],
      1u);
}

TEST(IncomingLayerLifecycleTest, CancelDuringAWriteKeepsTheBlocksUntilTheWriteReturns) {
  Receiver r(kSmall, 16, DType::kF32, 8);
  Expectation e = Expect(r, 1, 20);
  const Payload p = MakePayload(kSmall, 20, DType::kF32, 1);
  FakeTransport tx(r.landing, {1000});
  tx.Begin(e, 20, DType::kF32);
  const auto frame = LayerBytes(e.id, p, 0, 0, 20);
  tx.Start(frame);
  ASSERT_TRUE(r.landing.AcquireLayerWrite(&tx.layer()));  // a socket read is writing...
  EXPECT_TRUE(r.landing.Cancel(e.id));
  EXPECT_EQ(e.Wait().reason, TransferError::kCancelledByReceiver);
  r.pool.Release(e.table);
  for (BlockId b : e.table) EXPECT_EQ(r.pool.RefCount(b), 1) << "the write still owns the block";
  r.landing.ReleaseLayerWrite(&tx.layer());  // ...and returns
  EXPECT_TRUE(r.AllFree());
  EXPECT_FALSE(r.landing.AcquireLayerWrite(&tx.layer()));
  r.landing.FinishLayer(&tx.layer());  // incomplete: abandoned, the transfer already ended
  EXPECT_EQ(r.landing.Stats().transfers_failed, 1u);
}

TEST(IncomingLayerLifecycleTest, EndIsRefusedWhileAFrameIsUnverified) {
  Receiver r(kSmall, 16, DType::kF32, 8);
  Expectation e = Expect(r, 1, 20);
  const Payload p = MakePayload(kSmall, 20, DType::kF32, 1);
  FakeTransport tx(r.landing, {64});
  tx.Begin(e, 20, DType::kF32);
  tx.Send(LayerBytes(e.id, p, 0, 0, 20));
  const auto frame = LayerBytes(e.id, p, 1, 0, 20);
  std::span<const std::byte> payload = tx.Start(frame);  // claims the last range...
  ASSERT_TRUE(tx.Deliver(payload, payload.size()));      // ...and fills it, unverified
  tx.End(e.id);
  EXPECT_EQ(e.Wait().reason, TransferError::kIncomplete);
  r.landing.FinishLayer(&tx.layer());  // late: the transfer already failed
  r.pool.Release(e.table);
  EXPECT_TRUE(r.AllFree());
  EXPECT_EQ(r.landing.Stats().transfers_ok, 0u);
}

TEST(IncomingLayerLifecycleTest, DroppedMidPayloadEndsTheTransfer) {
  Receiver r(kSmall, 16, DType::kBF16, 8);
  Expectation abandoned = Expect(r, 1, 20);
  Expectation destroyed = Expect(r, 2, 20);
  const Payload p = MakePayload(kSmall, 20, DType::kF32, 1);  // staged (conversion)
  {
    FakeTransport tx(r.landing, {100});
    tx.Begin(abandoned, 20, DType::kF32);
    tx.Begin(destroyed, 20, DType::kF32);
    auto frame = LayerBytes(abandoned.id, p, 0, 0, 20);
    std::span<const std::byte> payload = tx.Start(frame);
    ASSERT_EQ(tx.layer().mode(), IncomingLayer::Mode::kStaged);
    ASSERT_TRUE(tx.Deliver(payload, 300));
    r.landing.AbandonLayer(&tx.layer(), TransferError::kPeerDisconnected, "connection lost");
    EXPECT_EQ(abandoned.Wait().reason, TransferError::kPeerDisconnected);

    auto frame2 = LayerBytes(destroyed.id, p, 0, 0, 20);
    payload = tx.Start(frame2);
    ASSERT_TRUE(tx.Deliver(payload, 7));
  }  // the transport goes away with the frame in progress
  EXPECT_EQ(destroyed.Wait().reason, TransferError::kPeerDisconnected);
  r.pool.Release(abandoned.table);
  r.pool.Release(destroyed.table);
  EXPECT_TRUE(r.AllFree());
}

TEST(IncomingLayerLifecycleTest, RefusedMalformedAndUnknownFramesAreDiscarded) {
  Receiver r(kSmall, 16, DType::kF32, 8);
  Expectation malformed = Expect(r, 1, 20);
  Expectation out_of_range = Expect(r, 2, 20);
  const Payload p = MakePayload(kSmall, 20, DType::kF32, 1);
  FakeTransport tx(r.landing, {100});
  tx.Begin(malformed, 20, DType::kF32);
  tx.Begin(out_of_range, 20, DType::kF32);

  auto bad_size = LayerBytes(malformed.id, p, 0, 0, 20);
  bad_size[kFrameHeaderBytes + 24] ^= std::byte{1};  // tensor_bytes no longer matches the body
  tx.Start(bad_size);
  EXPECT_EQ(tx.layer().mode(), IncomingLayer::Mode::kDiscard);
  EXPECT_EQ(tx.layer().payload_bytes(), bad_size.size() - kLayerPrefixBytes);
  r.landing.FinishLayer(&tx.layer());
  EXPECT_EQ(malformed.Wait().reason, TransferError::kMalformedFrame);

  auto bad_layer = LayerBytes(out_of_range.id, p, 0, 0, 20);
  bad_layer[kFrameHeaderBytes + 8] = std::byte{9};  // layer 9 of 2
  tx.Start(bad_layer);
  EXPECT_EQ(tx.layer().mode(), IncomingLayer::Mode::kDiscard);
  r.landing.FinishLayer(&tx.layer());
  EXPECT_EQ(out_of_range.Wait().reason, TransferError::kLayerOutOfRange);

  tx.Start(LayerBytes(77, p, 0, 0, 20));  // never expected
  EXPECT_EQ(tx.layer().mode(), IncomingLayer::Mode::kDiscard);
  r.landing.FinishLayer(&tx.layer());
  EXPECT_EQ(r.landing.Stats().unknown_frames, 1u);

  r.pool.Release(malformed.table);
  r.pool.Release(out_of_range.table);
  EXPECT_TRUE(r.AllFree());
}

// ---------------------------------------------------------------------------------------------
// HostKvStore::InPlaceRegions: bytes copied into the regions land as WriteTokens puts them.

TEST(InPlaceRegionsTest, MapsLikeWriteTokensAndMergesAdjacentBlocks) {
  const KvStoreLayout layout{kSmall, 4, DType::kBF16, 16};
  HostKvStore a(layout), b(layout);
  const std::vector<BlockId> table = {7, 3, 4, 5, 9, 10};  // runs: {7}, {3,4,5}, {9,10}
  const int64_t first = 2, n = 19;                         // slots 2..20 of a 24-slot table
  const Payload p = MakePayload(kSmall, n, DType::kBF16, 5);
  ASSERT_TRUE(
      a.WriteTokens(1, table, first, n, DType::kBF16, p.layers[1].k.data(), p.layers[1].v.data())
          .ok());
  std::vector<std::span<std::byte>> regions;
  ASSERT_TRUE(b.InPlaceRegions(1, table, first, n, DType::kBF16, &regions));
  EXPECT_EQ(regions.size(), 6u) << "3 runs of K, then 3 of V";
  std::vector<std::byte> payload = p.layers[1].k;
  payload.insert(payload.end(), p.layers[1].v.begin(), p.layers[1].v.end());
  size_t off = 0;
  for (auto& region : regions) {
    std::memcpy(region.data(), payload.data() + off, region.size());
    off += region.size();
  }
  EXPECT_EQ(off, payload.size());
  EXPECT_EQ(std::memcmp(a.KBlock(0, 0), b.KBlock(0, 0), a.total_bytes() / 2), 0);
  EXPECT_EQ(std::memcmp(a.VBlock(0, 0), b.VBlock(0, 0), a.total_bytes() / 2), 0);

  // Refused (and `regions` untouched) when the bytes would need converting or do not fit.
  regions.clear();
  EXPECT_FALSE(b.InPlaceRegions(1, table, first, n, DType::kF32, &regions));
  EXPECT_FALSE(b.InPlaceRegions(1, table, 20, 5, DType::kBF16, &regions));
  EXPECT_FALSE(b.InPlaceRegions(2, table, 0, 1, DType::kBF16, &regions));
  EXPECT_FALSE(b.InPlaceRegions(0, std::vector<BlockId>{99}, 0, 1, DType::kBF16, &regions));
  EXPECT_TRUE(regions.empty());
}

}  // namespace
}  // namespace tandem
