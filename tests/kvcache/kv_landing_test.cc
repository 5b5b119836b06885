// KvLanding and the in-process transport: round trips across dtypes, block sizes and token
// counts; every failure path ends one transfer with its reason and returns its blocks.
#include "kvcache/kv_landing.h"

#include <gtest/gtest.h>

#include <thread>

#include "kvcache/kv_in_process.h"
#include "tests/kvcache/kv_test_util.h"

namespace tandem {
namespace {

using testing::AckCollector;
using testing::Expect;
using testing::Expectation;
using testing::ExpectLanded;
using testing::kFingerprint;
using testing::MakePayload;
using testing::Payload;
using testing::Receiver;
using testing::SenderSpec;

const KvGeometry kSmall{2, 2, 8};

// ---------------------------------------------------------------------------------------------
// Round trips through the in-process transport.

struct RoundTripCase {
  DType src;
  DType dst;
  int32_t block_size;
  int64_t tokens;
  int32_t layers;
  int64_t start;
};

std::string CaseName(const ::testing::TestParamInfo<RoundTripCase>& info) {
  const auto& c = info.param;
  return std::string(DTypeName(c.src)) + "_to_" + std::string(DTypeName(c.dst)) + "_bs" +
         std::to_string(c.block_size) + "_t" + std::to_string(c.tokens) + "_l" +
         std::to_string(c.layers) + "_s" + std::to_string(c.start);
}

std::vector<RoundTripCase> RoundTripCases() {
  std::vector<RoundTripCase> cases;
  const DType all[] = {DType::kF32, DType::kF16, DType::kBF16};
  for (DType src : all) {
    for (DType dst : all) {
      for (int64_t t : {1, 15, 16, 17}) {
        cases.push_back({src, dst, 16, t, 2, 0});
      }
      cases.push_back({src, dst, 32, 33, 3, 5});  // unaligned start position
    }
  }
  for (int64_t t : {31, 32, 33}) cases.push_back({DType::kBF16, DType::kF32, 32, t, 1, 0});
  cases.push_back({DType::kBF16, DType::kBF16, 16, 4096, 2, 0});
  cases.push_back({DType::kBF16, DType::kF32, 32, 4096, 2, 0});
  cases.push_back({DType::kF16, DType::kBF16, 8, 4096, 1, 3});
  return cases;
}

class InProcessRoundTripTest : public ::testing::TestWithParam<RoundTripCase> {};

TEST_P(InProcessRoundTripTest, LandsBitExactAfterConversion) {
  const RoundTripCase c = GetParam();
  const KvGeometry g{c.layers, 2, 8};
  const int32_t blocks = static_cast<int32_t>((c.start + c.tokens) / c.block_size + 2);
  Receiver r(g, c.block_size, c.dst, blocks);
  Expectation e = Expect(r, 11, c.tokens, c.start);
  const Payload p = MakePayload(g, c.tokens, c.src, 1234);

  InProcessKvSenderOptions opts;
  opts.max_frame_payload_bytes = 1024;  // several LAYER frames per slice
  InProcessKvSender sender(r.landing, opts);
  AckCollector acks;
  auto t = sender.Begin(SenderSpec(r, e, c.tokens, c.src), acks.Callback());
  ASSERT_TRUE(t.ok()) << t.status();
  // Chunked prefill: the first half of every layer, then the rest.
  const int64_t half = c.tokens / 2;
  const uint64_t tb = p.token_bytes();
  for (int pass = 0; pass < 2; ++pass) {
    const int64_t first = pass == 0 ? 0 : half;
    const int64_t n = pass == 0 ? half : c.tokens - half;
    if (n == 0) continue;
    for (int l = 0; l < c.layers; ++l) {
      LayerSlice s;
      s.layer = l;
      s.first_token = first;
      s.token_count = n;
      s.k = p.layers[l].k.data() + first * tb;
      s.v = p.layers[l].v.data() + first * tb;
      s.dtype = c.src;
      ASSERT_TRUE((*t)->SendLayer(s).ok());
    }
  }
  ASSERT_TRUE((*t)->Finish(77, -0.25f).ok());
  auto ack = acks.Wait(11);
  ASSERT_TRUE(ack.has_value());
  EXPECT_TRUE(ack->status.ok()) << ack->status;
  LandingOutcome o = e.Wait();
  ASSERT_TRUE(o.status.ok()) << o.status;
  EXPECT_EQ(o.first_token, 77);
  EXPECT_EQ(o.first_logprob, -0.25f);
  EXPECT_EQ(o.block_table, e.table);
  EXPECT_EQ(o.bytes_received, 2 * tb * c.tokens * c.layers);
  ExpectLanded(r, e, p);
  r.pool.Release(e.table);
  EXPECT_TRUE(r.AllFree());
  EXPECT_EQ(r.landing.Stats().transfers_ok, 1u);
}

INSTANTIATE_TEST_SUITE_P(Matrix, InProcessRoundTripTest, ::testing::ValuesIn(RoundTripCases()),
                         CaseName);

TEST(InProcessTransportTest, PagedBf16Block16SenderFeedsFp32Block32Receiver) {
  const KvGeometry g{4, 2, 16};
  const int64_t tokens = 50;
  // The prefill side's own paged store: block size 16, bf16.
  BlockPool src_pool(8, 16);
  HostKvStore src_store(KvStoreLayout{g, 16, DType::kBF16, 8});
  auto src_table = src_pool.Allocate(4);
  ASSERT_TRUE(src_table.ok());
  const Payload p = MakePayload(g, tokens, DType::kBF16, 5);
  for (int l = 0; l < g.num_layers; ++l) {
    ASSERT_TRUE(src_store
                    .WriteTokens(l, *src_table, 0, tokens, DType::kBF16, p.layers[l].k.data(),
                                 p.layers[l].v.data())
                    .ok());
  }
  Receiver r(g, 32, DType::kF32, 4);
  Expectation e = Expect(r, 1, tokens);
  InProcessKvSender sender(r.landing);
  AckCollector acks;
  auto t = sender.Begin(SenderSpec(r, e, tokens, DType::kBF16), acks.Callback());
  ASSERT_TRUE(t.ok());
  std::vector<std::byte> k(tokens * p.token_bytes()), v(k.size());
  for (int l = 0; l < g.num_layers; ++l) {
    ASSERT_TRUE(
        src_store.ReadTokens(l, *src_table, 0, tokens, DType::kBF16, k.data(), v.data()).ok());
    ASSERT_TRUE((*t)->SendLayer(l, k.data(), v.data(), DType::kBF16).ok());
  }
  ASSERT_TRUE((*t)->Finish(3, 0.0f).ok());
  ASSERT_TRUE(e.Wait().status.ok());
  ExpectLanded(r, e, p);
  r.pool.Release(e.table);
  src_pool.Release(*src_table);
  EXPECT_TRUE(r.AllFree());
}

TEST(InProcessTransportTest, SenderValidatesItsOwnCalls) {
  Receiver r(kSmall, 16, DType::kF32, 4);
  Expectation e = Expect(r, 3, 10);
  InProcessKvSender sender(r.landing);
  AckCollector acks;
  auto t = sender.Begin(SenderSpec(r, e, 10, DType::kF16), acks.Callback());
  ASSERT_TRUE(t.ok());
  const Payload p = MakePayload(kSmall, 10, DType::kF16, 1);
  EXPECT_FALSE((*t)->SendLayer(2, p.layers[0].k.data(), p.layers[0].v.data(), DType::kF16).ok());
  EXPECT_FALSE((*t)->SendLayer(0, p.layers[0].k.data(), p.layers[0].v.data(), DType::kF32).ok());
  EXPECT_FALSE((*t)->Finish(1, 0.0f).ok());  // layers missing: refused locally
  ASSERT_TRUE((*t)->SendLayer(0, p.layers[0].k.data(), p.layers[0].v.data(), DType::kF16).ok());
  EXPECT_FALSE((*t)->SendLayer(0, p.layers[0].k.data(), p.layers[0].v.data(), DType::kF16).ok())
      << "a layer twice";
  (*t)->Abort(TransferError::kAbortedBySender, "test gives up");
  auto ack = acks.Wait(3);
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(ack->reason, TransferError::kAbortedBySender);
  EXPECT_EQ(e.Wait().reason, TransferError::kAbortedBySender);
  r.pool.Release(e.table);
  EXPECT_TRUE(r.AllFree());
}

TEST(InProcessTransportTest, IncarnationMismatchIsRefusedAtBegin) {
  KvLandingOptions lo;
  lo.incarnation_id = 1000;
  Receiver r(kSmall, 16, DType::kF32, 4, lo);
  Expectation e = Expect(r, 3, 10);
  InProcessKvSender sender(r.landing);
  auto spec = SenderSpec(r, e, 10, DType::kF32);
  spec.receiver_incarnation = 999;  // the ticket came from an older incarnation
  auto t = sender.Begin(spec, nullptr);
  EXPECT_EQ(t.status().code(), absl::StatusCode::kFailedPrecondition);
  r.landing.Cancel(3);
  r.pool.Release(e.table);
  EXPECT_TRUE(r.AllFree());
}

TEST(InProcessTransportTest, AbandonedTransferIsAbortedAndAcknowledged) {
  Receiver r(kSmall, 16, DType::kF32, 4);
  Expectation e = Expect(r, 3, 10);
  AckCollector acks;
  {
    InProcessKvSender sender(r.landing);
    auto t = sender.Begin(SenderSpec(r, e, 10, DType::kF32), acks.Callback());
    ASSERT_TRUE(t.ok());
  }  // transfer and sender destroyed mid-way
  EXPECT_EQ(e.Wait().reason, TransferError::kAbortedBySender);
  EXPECT_EQ(acks.Count(3), 1u);
  r.pool.Release(e.table);
  EXPECT_TRUE(r.AllFree());
}

// ---------------------------------------------------------------------------------------------
// Frame-level behaviour of the landing, driven with hand-made frames.

class RecordingSink : public ResultSink {
 public:
  void SendResult(const ResultFrame& f) override {
    absl::MutexLock lock(&mu_);
    results_.push_back({f.transfer_id, f.reason});
  }
  std::vector<std::pair<uint64_t, TransferError>> results() {
    absl::MutexLock lock(&mu_);
    return results_;
  }
  std::optional<TransferError> For(uint64_t id) {
    for (auto& [i, r] : results()) {
      if (i == id) return r;
    }
    return std::nullopt;
  }

 private:
  absl::Mutex mu_;
  std::vector<std::pair<uint64_t, TransferError>> results_ ABSL_GUARDED_BY(mu_);
};

// One peer of a landing that sends hand-made frames.
class FramePeer {
 public:
  explicit FramePeer(KvLanding& landing)
      : landing_(landing), sink_(std::make_shared<RecordingSink>()) {
    peer_ = landing_.AttachPeer(sink_);
  }
  void Begin(const Expectation& e, int64_t tokens, DType dtype = DType::kF32,
             uint64_t fingerprint = kFingerprint, KvGeometry g = kSmall) {
    BeginFrame b;
    b.transfer_id = e.id;
    b.token = e.token;
    b.model_fingerprint = fingerprint;
    b.geometry = g;
    b.dtype = dtype;
    b.token_count = static_cast<uint64_t>(tokens);
    b.start_position = static_cast<uint64_t>(e.start);
    Send(b);
  }
  // Sends tokens [first, first+n) of `layer` from `p`.
  void Layer(uint64_t id, const Payload& p, uint32_t layer, uint64_t first, uint32_t n,
             bool corrupt = false) {
    const uint64_t tb = p.token_bytes();
    LayerFrame f;
    f.transfer_id = id;
    f.layer = layer;
    f.first_token = first;
    f.token_count = n;
    f.k =
        std::span<const std::byte>(p.layers[layer % p.layers.size()].k).subspan(first * tb, n * tb);
    f.v =
        std::span<const std::byte>(p.layers[layer % p.layers.size()].v).subspan(first * tb, n * tb);
    f.checksum = LayerChecksum(f.k, f.v) ^ (corrupt ? 1 : 0);
    Send(f);
  }
  void AllLayers(uint64_t id, const Payload& p) {
    for (int l = 0; l < p.geometry.num_layers; ++l) {
      Layer(id, p, l, 0, static_cast<uint32_t>(p.tokens));
    }
  }
  void End(uint64_t id) { Send(EndFrame{id, 42, -1.0f}); }
  // Frames that concern one transfer never fail the connection.
  void Send(const Frame& f) { EXPECT_TRUE(landing_.OnFrame(peer_, f).ok()); }
  absl::Status Apply(const Frame& f) { return landing_.OnFrame(peer_, f); }
  absl::Status ApplyRaw(const std::vector<std::byte>& frame) {
    auto h = DecodeFrameHeader(frame, kDefaultMaxFrameBytes);
    EXPECT_TRUE(h.ok());
    return landing_.OnFrame(peer_, h->type,
                            std::span<const std::byte>(frame).subspan(kFrameHeaderBytes));
  }
  void Disconnect() { landing_.DetachPeer(peer_, "test disconnect"); }
  RecordingSink& sink() { return *sink_; }

 private:
  KvLanding& landing_;
  std::shared_ptr<RecordingSink> sink_;
  PeerId peer_;
};

// A scenario: two transfers on one peer; `break_it` damages the first, the second must land.
class LandingFailureTest : public ::testing::Test {
 protected:
  LandingFailureTest() : r_(kSmall, 16, DType::kF32, 16), peer_(r_.landing) {}

  void RunScenario(
      TransferError want,
      const std::function<void(FramePeer&, const Expectation&, const Payload&)>& break_it) {
    Expectation bad = Expect(r_, 100, 20);
    Expectation good = Expect(r_, 200, 20);
    const Payload p = MakePayload(kSmall, 20, DType::kF32, 9);
    peer_.Begin(good, 20);
    peer_.Layer(good.id, p, 0, 0, 20);
    break_it(peer_, bad, p);
    peer_.Layer(good.id, p, 1, 0, 20);
    peer_.End(good.id);

    LandingOutcome o = bad.Wait();
    EXPECT_EQ(o.reason, want) << o.status;
    EXPECT_FALSE(o.status.ok());
    EXPECT_NE(o.status.message().find(std::string(TransferErrorName(want))), std::string::npos)
        << o.status;
    LandingOutcome ok = good.Wait();
    EXPECT_TRUE(ok.status.ok()) << ok.status;
    ExpectLanded(r_, good, p);
    // The failed transfer released its reference; after the test's own release all is free.
    for (BlockId b : bad.table) EXPECT_EQ(r_.pool.RefCount(b), 1);
    r_.pool.Release(bad.table);
    r_.pool.Release(good.table);
    EXPECT_EQ(r_.pool.CheckInvariants(), "");
    EXPECT_TRUE(r_.AllFree());
    const LandingStats s = r_.landing.Stats();
    EXPECT_EQ(s.failed_by_reason[static_cast<int>(want)], 1u);
    EXPECT_EQ(s.transfers_ok, 1u);
    EXPECT_EQ(s.active_transfers, 0u);
  }

  Receiver r_;
  FramePeer peer_;
};

TEST_F(LandingFailureTest, WrongToken) {
  RunScenario(TransferError::kBadToken, [](FramePeer& peer, const Expectation& e, auto&) {
    Expectation forged;
    forged.id = e.id;
    forged.token = e.token;
    forged.token[0] ^= 0xff;
    peer.Begin(forged, 20);
    EXPECT_EQ(peer.sink().For(e.id), TransferError::kBadToken);
  });
}

TEST_F(LandingFailureTest, WrongFingerprint) {
  RunScenario(TransferError::kFingerprintMismatch,
              [](FramePeer& peer, const Expectation& e, auto&) {
                peer.Begin(e, 20, DType::kF32, kFingerprint + 1);
              });
}

TEST_F(LandingFailureTest, WrongGeometry) {
  RunScenario(TransferError::kLayoutMismatch, [](FramePeer& peer, const Expectation& e, auto&) {
    peer.Begin(e, 20, DType::kF32, kFingerprint, KvGeometry{2, 4, 8});
  });
}

TEST_F(LandingFailureTest, WrongTokenCount) {
  RunScenario(TransferError::kLayoutMismatch,
              [](FramePeer& peer, const Expectation& e, auto&) { peer.Begin(e, 21); });
}

TEST_F(LandingFailureTest, LayerIndexOutOfRange) {
  RunScenario(TransferError::kLayerOutOfRange,
              [](FramePeer& peer, const Expectation& e, const Payload& p) {
                peer.Begin(e, 20);
                peer.Layer(e.id, p, 2, 0, 20);
              });
}

TEST_F(LandingFailureTest, TokenRangeOutOfRange) {
  RunScenario(TransferError::kTokenRangeOutOfRange,
              [](FramePeer& peer, const Expectation& e, auto&) {
                peer.Begin(e, 20);
                Payload big = MakePayload(kSmall, 40, DType::kF32, 1);
                peer.Layer(e.id, big, 0, 10, 30);  // [10, 40) of 20
              });
}

TEST_F(LandingFailureTest, TokenRangeWithHugeFirstTokenDoesNotWrap) {
  RunScenario(TransferError::kTokenRangeOutOfRange,
              [](FramePeer& peer, const Expectation& e, const Payload& p) {
                peer.Begin(e, 20);
                LayerFrame f;
                f.transfer_id = e.id;
                f.first_token = std::numeric_limits<uint64_t>::max() - 5;
                f.token_count = 10;
                f.k = std::span<const std::byte>(p.layers[0].k).first(10 * p.token_bytes());
                f.v = std::span<const std::byte>(p.layers[0].v).first(10 * p.token_bytes());
                peer.Send(f);
              });
}

TEST_F(LandingFailureTest, GapInALayer) {
  RunScenario(TransferError::kTokenRangeOutOfRange,
              [](FramePeer& peer, const Expectation& e, const Payload& p) {
                peer.Begin(e, 20);
                peer.Layer(e.id, p, 0, 5, 15);
              });
}

TEST_F(LandingFailureTest, DuplicateLayer) {
  RunScenario(TransferError::kDuplicateLayer,
              [](FramePeer& peer, const Expectation& e, const Payload& p) {
                peer.Begin(e, 20);
                peer.Layer(e.id, p, 0, 0, 20);
                peer.Layer(e.id, p, 0, 0, 20);
              });
}

TEST_F(LandingFailureTest, OverlappingRangeIsADuplicate) {
  RunScenario(TransferError::kDuplicateLayer,
              [](FramePeer& peer, const Expectation& e, const Payload& p) {
                peer.Begin(e, 20);
                peer.Layer(e.id, p, 1, 0, 12);
                peer.Layer(e.id, p, 1, 8, 12);
              });
}

TEST_F(LandingFailureTest, PayloadOfWrongDtypeSize) {
  RunScenario(TransferError::kSizeMismatch, [](FramePeer& peer, const Expectation& e, auto&) {
    peer.Begin(e, 20, DType::kF32);
    const Payload half = MakePayload(kSmall, 20, DType::kBF16, 1);  // half the bytes
    peer.Layer(e.id, half, 0, 0, 20);
  });
}

TEST_F(LandingFailureTest, ChecksumMismatchIsCaughtBeforeWriting) {
  RunScenario(TransferError::kChecksumMismatch, [this](FramePeer& peer, const Expectation& e,
                                                       const Payload& p) {
    peer.Begin(e, 20);
    peer.Layer(e.id, p, 0, 0, 20, /*corrupt=*/true);
    // Nothing was written: the blocks still read as zeros.
    std::vector<float> k(20 * kSmall.token_elems()), v(k.size());
    ASSERT_TRUE(r_.store.ReadTokens(0, e.table, 0, 20, DType::kF32, k.data(), v.data()).ok());
    for (float x : k) ASSERT_EQ(x, 0.0f);
  });
}

TEST_F(LandingFailureTest, MissingLayersThenEnd) {
  RunScenario(TransferError::kIncomplete,
              [](FramePeer& peer, const Expectation& e, const Payload& p) {
                peer.Begin(e, 20);
                peer.Layer(e.id, p, 0, 0, 20);
                peer.Layer(e.id, p, 1, 0, 19);
                peer.End(e.id);
                EXPECT_EQ(peer.sink().For(e.id), TransferError::kIncomplete);
              });
}

TEST_F(LandingFailureTest, LayerBeforeBegin) {
  RunScenario(TransferError::kProtocolViolation,
              [](FramePeer& peer, const Expectation& e, const Payload& p) {
                peer.Layer(e.id, p, 0, 0, 20);
              });
}

TEST_F(LandingFailureTest, BeginTwice) {
  RunScenario(TransferError::kProtocolViolation, [](FramePeer& peer, const Expectation& e, auto&) {
    peer.Begin(e, 20);
    peer.Begin(e, 20);
  });
}

TEST_F(LandingFailureTest, MalformedBodyBlamesItsTransfer) {
  RunScenario(TransferError::kMalformedFrame,
              [](FramePeer& peer, const Expectation& e, const Payload& p) {
                peer.Begin(e, 20);
                LayerFrame f;
                f.transfer_id = e.id;
                f.token_count = 20;
                f.k = std::span<const std::byte>(p.layers[0].k);
                f.v = std::span<const std::byte>(p.layers[0].v);
                std::vector<std::byte> bytes(EncodedSize(f));
                Encode(f, bytes);
                bytes[kFrameHeaderBytes + 24] = std::byte{0xff};  // tensor_bytes no longer matches
                EXPECT_TRUE(peer.ApplyRaw(bytes).ok()) << "the connection survives";
              });
}

TEST_F(LandingFailureTest, AbortFromSenderIsAcknowledged) {
  RunScenario(TransferError::kAbortedBySender,
              [](FramePeer& peer, const Expectation& e, const Payload& p) {
                peer.Begin(e, 20);
                peer.Layer(e.id, p, 0, 0, 20);
                peer.Send(AbortFrame{e.id, TransferError::kAbortedBySender, "prefill failed"});
                EXPECT_EQ(peer.sink().For(e.id), TransferError::kAbortedBySender);  // the ack
              });
}

TEST_F(LandingFailureTest, CancelByDecodeSideNotifiesTheSender) {
  RunScenario(TransferError::kCancelledByReceiver,
              [this](FramePeer& peer, const Expectation& e, const Payload& p) {
                peer.Begin(e, 20);
                peer.Layer(e.id, p, 0, 0, 20);
                EXPECT_TRUE(r_.landing.Cancel(e.id));
                EXPECT_FALSE(r_.landing.Cancel(e.id));
                EXPECT_EQ(peer.sink().For(e.id), TransferError::kCancelledByReceiver);
                // Frames that were already on the wire are ignored.
                peer.Layer(e.id, p, 1, 0, 20);
                peer.End(e.id);
              });
}

TEST_F(LandingFailureTest, ForeignPeerCannotTouchAStreamingTransfer) {
  RunScenario(TransferError::kIncomplete,
              [this](FramePeer& peer, const Expectation& e, const Payload& p) {
                peer.Begin(e, 20);
                FramePeer intruder(r_.landing);
                intruder.Begin(e, 20);  // token already used
                intruder.Layer(e.id, p, 0, 0, 20);
                intruder.Send(AbortFrame{e.id, TransferError::kAbortedBySender, "x"});
                EXPECT_EQ(intruder.sink().For(e.id), TransferError::kBadToken);
                EXPECT_EQ(r_.landing.Stats().foreign_frames, 3u);
                peer.End(e.id);  // only now does the transfer end: incomplete
              });
}

TEST(LandingTest, DeadlinesReapBeforeBeginAndMidTransfer) {
  Receiver r(kSmall, 16, DType::kF32, 8);
  FramePeer peer(r.landing);
  const auto now = KvClock::now();
  Expectation idle = Expect(r, 1, 10, 0, std::chrono::milliseconds(100));
  Expectation mid = Expect(r, 2, 10, 0, std::chrono::milliseconds(100));
  Expectation later = Expect(r, 3, 10, 0, std::chrono::seconds(60));
  const Payload p = MakePayload(kSmall, 10, DType::kF32, 3);
  peer.Begin(mid, 10);
  peer.Layer(mid.id, p, 0, 0, 10);
  ASSERT_TRUE(r.landing.NextDeadline().has_value());
  EXPECT_LE(*r.landing.NextDeadline(), now + std::chrono::milliseconds(200));
  EXPECT_EQ(r.landing.ReapExpired(now), 0);
  EXPECT_EQ(r.landing.ReapExpired(now + std::chrono::seconds(1)), 2);
  EXPECT_EQ(idle.Wait().reason, TransferError::kDeadlineExceeded);
  EXPECT_EQ(mid.Wait().reason, TransferError::kDeadlineExceeded);
  EXPECT_EQ(peer.sink().For(mid.id), TransferError::kDeadlineExceeded);
  // A completion after reclaim is counted and answered, never asserted.
  peer.Layer(mid.id, p, 1, 0, 10);
  peer.End(mid.id);
  EXPECT_EQ(r.landing.Stats().late_frames, 2u);
  EXPECT_EQ(peer.sink().results().size(), 2u);  // the reap, then the late END
  // The live one is untouched.
  EXPECT_TRUE(r.landing.Cancel(later.id));
  for (auto* e : {&idle, &mid, &later}) r.pool.Release(e->table);
  EXPECT_TRUE(r.AllFree());
}

TEST(LandingTest, DisconnectEndsOnlyThatPeersTransfers) {
  Receiver r(kSmall, 16, DType::kF32, 8);
  FramePeer a(r.landing), b(r.landing);
  Expectation ea = Expect(r, 1, 10), eb = Expect(r, 2, 10);
  const Payload p = MakePayload(kSmall, 10, DType::kF32, 3);
  a.Begin(ea, 10);
  b.Begin(eb, 10);
  a.Layer(ea.id, p, 0, 0, 5);  // mid-layer
  a.Disconnect();
  EXPECT_EQ(ea.Wait().reason, TransferError::kPeerDisconnected);
  b.AllLayers(eb.id, p);
  b.End(eb.id);
  EXPECT_TRUE(eb.Wait().status.ok());
  r.pool.Release(ea.table);
  r.pool.Release(eb.table);
  EXPECT_TRUE(r.AllFree());
}

TEST(LandingTest, UnknownTransferIsAnsweredAndHarmless) {
  Receiver r(kSmall, 16, DType::kF32, 8);
  FramePeer peer(r.landing);
  Expectation e;
  e.id = 555;
  peer.Begin(e, 10);
  EXPECT_EQ(peer.sink().For(555), TransferError::kUnknownTransfer);
  EXPECT_EQ(r.landing.Stats().unknown_frames, 1u);
  EXPECT_FALSE(peer.Apply(HelloFrame{}).ok()) << "HELLO mid-stream is a connection error";
  EXPECT_FALSE(peer.Apply(ResultFrame{}).ok());
  EXPECT_TRUE(r.AllFree());
}

TEST(LandingTest, ExpectTransferValidatesBeforeTakingReferences) {
  Receiver r(kSmall, 16, DType::kF32, 4);
  auto blocks = r.pool.Allocate(2);
  ASSERT_TRUE(blocks.ok());
  ExpectedTransfer s;
  s.transfer_id = 1;
  s.geometry = kSmall;
  s.token_count = 40;  // needs 3 blocks
  s.block_table = *blocks;
  EXPECT_FALSE(r.landing.ExpectTransfer(s).ok());
  s.token_count = 32;
  s.geometry = KvGeometry{3, 2, 8};
  EXPECT_FALSE(r.landing.ExpectTransfer(s).ok());
  s.geometry = kSmall;
  s.block_table = {(*blocks)[0], 3};  // block 3 is not reserved
  EXPECT_EQ(r.landing.ExpectTransfer(s).code(), absl::StatusCode::kFailedPrecondition);
  s.block_table = *blocks;
  s.transfer_id = 0;
  EXPECT_FALSE(r.landing.ExpectTransfer(s).ok());
  s.transfer_id = 1;
  s.deadline = KvClock::now() + std::chrono::seconds(10);
  ASSERT_TRUE(r.landing.ExpectTransfer(s).ok());
  EXPECT_EQ(r.landing.ExpectTransfer(s).code(), absl::StatusCode::kAlreadyExists);
  for (BlockId b : *blocks) EXPECT_EQ(r.pool.RefCount(b), 2);  // caller + landing
  r.landing.Cancel(1);
  for (BlockId b : *blocks) EXPECT_EQ(r.pool.RefCount(b), 1);
  r.pool.Release(*blocks);
  EXPECT_TRUE(r.AllFree());
}

TEST(LandingTest, HelloChecksVersionRoleAndSecret) {
  KvLandingOptions o;
  o.hello_secret = "s3cret";
  o.incarnation_id = 77;
  Receiver r(kSmall, 16, DType::kF32, 4, o);
  HelloFrame h;
  h.auth = "s3cret";
  EXPECT_TRUE(r.landing.AcceptHello(1, h).ok());
  h.auth = "s3creT";
  EXPECT_EQ(r.landing.AcceptHello(1, h).code(), absl::StatusCode::kUnauthenticated);
  h.auth = "s3cret";
  h.protocol_version = 2;
  EXPECT_FALSE(r.landing.AcceptHello(1, h).ok());
  h.protocol_version = kWireVersion;
  h.role = PeerRole::kReceiver;
  EXPECT_FALSE(r.landing.AcceptHello(1, h).ok());
  EXPECT_EQ(r.landing.LocalHello().incarnation_id, 77u);
  EXPECT_EQ(r.landing.LocalHello().role, PeerRole::kReceiver);
}

// A store whose writes wait for the test's signal: a write that is still in flight.
class GatedStore final : public KvStore {
 public:
  explicit GatedStore(const KvStoreLayout& layout) : inner_(layout) {}
  const KvStoreLayout& layout() const override { return inner_.layout(); }
  absl::Status WriteTokens(int32_t layer, std::span<const BlockId> table, int64_t first, int64_t n,
                           DType src, const void* k, const void* v) override {
    {
      absl::MutexLock lock(&mu_);
      entered_ = true;
      mu_.Await(absl::Condition(&open_));
    }
    return inner_.WriteTokens(layer, table, first, n, src, k, v);
  }
  absl::Status ReadTokens(int32_t layer, std::span<const BlockId> table, int64_t first, int64_t n,
                          DType dst, void* k, void* v) const override {
    return inner_.ReadTokens(layer, table, first, n, dst, k, v);
  }
  bool WaitEntered() {
    absl::MutexLock lock(&mu_);
    return mu_.AwaitWithTimeout(absl::Condition(&entered_), absl::Seconds(10));
  }
  void Open() {
    absl::MutexLock lock(&mu_);
    open_ = true;
  }

 private:
  HostKvStore inner_;
  absl::Mutex mu_;
  bool entered_ ABSL_GUARDED_BY(mu_) = false;
  bool open_ ABSL_GUARDED_BY(mu_) = false;
};

TEST(LandingTest, CancelDuringAWriteKeepsTheBlocksUntilTheWriterLetsGo) {
  const KvStoreLayout layout{kSmall, 16, DType::kF32, 4};
  BlockPool pool(4, 16);
  GatedStore store(layout);
  KvLanding landing(pool, store);
  auto table = pool.Allocate(1);
  ASSERT_TRUE(table.ok());
  std::promise<LandingOutcome> done;
  ExpectedTransfer s;
  s.transfer_id = 9;
  s.token = testing::TokenFor(9);
  s.model_fingerprint = kFingerprint;
  s.geometry = kSmall;
  s.token_count = 10;
  s.block_table = *table;
  s.deadline = KvClock::now() + std::chrono::seconds(30);
  s.on_done = [&](const LandingOutcome& o) { done.set_value(o); };
  ASSERT_TRUE(landing.ExpectTransfer(s).ok());
  FramePeer peer(landing);
  Expectation e;
  e.id = 9;
  e.token = s.token;
  peer.Begin(e, 10);
  const Payload p = MakePayload(kSmall, 10, DType::kF32, 4);
  std::thread writer([&] { peer.Layer(9, p, 0, 0, 10); });
  ASSERT_TRUE(store.WaitEntered());
  // The decode side gives up and releases its own reference while the write is in flight.
  EXPECT_TRUE(landing.Cancel(9));
  auto f = done.get_future();
  ASSERT_EQ(f.wait_for(testing::kWait), std::future_status::ready);
  EXPECT_EQ(f.get().reason, TransferError::kCancelledByReceiver);
  pool.Release(*table);
  EXPECT_EQ(pool.RefCount((*table)[0]), 1) << "the writer still owns the block";
  EXPECT_EQ(pool.num_free_blocks(), 3);
  store.Open();
  writer.join();
  EXPECT_EQ(pool.num_free_blocks(), 4);
  EXPECT_EQ(pool.CheckInvariants(), "");
}

TEST(LandingTest, ShutdownEndsLiveTransfers) {
  BlockPool pool(4, 16);
  HostKvStore store(KvStoreLayout{kSmall, 16, DType::kF32, 4});
  std::vector<BlockId> table;
  std::optional<TransferError> reason;
  {
    KvLanding landing(pool, store);
    table = *pool.Allocate(1);
    ExpectedTransfer s;
    s.transfer_id = 1;
    s.geometry = kSmall;
    s.token_count = 4;
    s.block_table = table;
    s.deadline = KvClock::now() + std::chrono::seconds(30);
    s.on_done = [&](const LandingOutcome& o) { reason = o.reason; };
    ASSERT_TRUE(landing.ExpectTransfer(s).ok());
  }
  EXPECT_EQ(reason, TransferError::kShutdown);
  pool.Release(table);
  EXPECT_EQ(pool.num_free_blocks(), 4);
}

}  // namespace
}  // namespace tandem
