// Hostile senders over real loopback sockets: each bad frame ends its own transfer with a specific
// reason and frees its blocks, while other transfers (on the same connection where framing
// survives, on other connections where it cannot) complete intact.
#include <gtest/gtest.h>

#include <functional>
#include <limits>

#include "tests/kvcache/transport/tcp_fixture.h"
#include "tests/kvcache/transport/transport_test_util.h"

namespace tandem {
namespace {

using testing::AckCollector;
using testing::Expect;
using testing::Expectation;
using testing::ExpectLanded;
using testing::kFingerprint;
using testing::MakeClient;
using testing::MakePayload;
using testing::OwnedResult;
using testing::Payload;
using testing::RawPeer;
using testing::SenderSpec;
using testing::StreamPayload;
using testing::TcpReceiver;

const KvGeometry kGeo{2, 2, 8};
constexpr int64_t kTokens = 20;

std::vector<std::byte> BeginBytes(const Expectation& e, int64_t tokens = kTokens,
                                  uint64_t fingerprint = kFingerprint) {
  BeginFrame b;
  b.transfer_id = e.id;
  b.token = e.token;
  b.model_fingerprint = fingerprint;
  b.geometry = kGeo;
  b.dtype = DType::kF32;
  b.token_count = static_cast<uint64_t>(tokens);
  b.start_position = static_cast<uint64_t>(e.start);
  std::vector<std::byte> out(EncodedSize(b));
  Encode(b, out);
  return out;
}

std::vector<std::byte> LayerBytes(uint64_t id, const Payload& p, uint32_t layer, uint64_t first,
                                  uint32_t n, bool corrupt = false) {
  const uint64_t tb = p.token_bytes();
  LayerFrame f;
  f.transfer_id = id;
  f.layer = layer;
  f.first_token = first;
  f.token_count = n;
  f.k = std::span<const std::byte>(p.layers[layer % 2].k).subspan(first * tb, n * tb);
  f.v = std::span<const std::byte>(p.layers[layer % 2].v).subspan(first * tb, n * tb);
  f.checksum = LayerChecksum(f.k, f.v) ^ (corrupt ? 0x10 : 0);
  std::vector<std::byte> out(EncodedSize(f));
  Encode(f, out);
  return out;
}

void Poke(std::vector<std::byte>& b, size_t off, uint64_t v, int width) {
  for (int i = 0; i < width; ++i) b[off + i] = static_cast<std::byte>(v >> (8 * i));
}

std::vector<std::byte> EndBytes(uint64_t id) {
  std::vector<std::byte> out(EncodedSize(EndFrame{}));
  Encode(EndFrame{id, 7, -0.5f}, out);
  return out;
}

// Writes `bytes` as separate writes (TCP_NODELAY: separate segments) whose sizes cycle through
// `pieces`, so the receiver meets frame boundaries, the LAYER fixed part and the payload at odd
// offsets.
void SendInPieces(RawPeer& peer, std::span<const std::byte> bytes,
                  const std::vector<size_t>& pieces) {
  size_t i = 0;
  for (size_t off = 0; off < bytes.size(); off += pieces[i++ % pieces.size()]) {
    peer.Send(bytes.subspan(off, std::min(pieces[i % pieces.size()], bytes.size() - off)));
  }
}

const std::vector<size_t> kAwkwardPieces = {1, 15, 40, 3, 4099, 17, 56};

class TcpHostileTest : public ::testing::Test {
 protected:
  TcpHostileTest()
      : rx_(kGeo, 16, DType::kF32, 64), p_(MakePayload(kGeo, kTokens, DType::kF32, 3)) {}

  // Two transfers on one raw connection: `bad` is broken by `break_it`, `good` must land.
  void RunOnSharedConnection(TransferError want,
                             const std::function<void(RawPeer&, const Expectation&)>& break_it,
                             std::chrono::milliseconds bad_timeout = std::chrono::seconds(30)) {
    Expectation bad = Expect(rx_.r, 100, kTokens, 0, bad_timeout);
    Expectation good = Expect(rx_.r, 200, kTokens, 0);
    RawPeer peer(rx_.server->port());
    peer.Handshake();
    peer.Send(BeginBytes(good));
    peer.Send(LayerBytes(good.id, p_, 0, 0, kTokens));
    break_it(peer, bad);
    peer.Send(LayerBytes(good.id, p_, 1, 0, kTokens));
    peer.Send(EndBytes(good.id));

    LandingOutcome o = bad.Wait();
    EXPECT_EQ(o.reason, want) << o.status;
    EXPECT_NE(o.status.message().find(std::string(TransferErrorName(want))), std::string::npos);
    ASSERT_TRUE(good.Wait().status.ok());
    ExpectLanded(rx_.r, good, p_);
    // The sender hears about both: the failure and the success.
    std::optional<OwnedResult> bad_result, good_result;
    while (!bad_result || !good_result) {
      auto r = peer.ReadResult();
      ASSERT_TRUE(r.has_value()) << "missing RESULT";
      if (r->transfer_id == bad.id && !bad_result) bad_result = r;
      if (r->transfer_id == good.id) good_result = r;
    }
    EXPECT_EQ(bad_result->reason, want);
    EXPECT_EQ(bad_result->code, TransferErrorCode(want));
    EXPECT_EQ(good_result->reason, TransferError::kOk);
    rx_.r.pool.Release(bad.table);
    rx_.r.pool.Release(good.table);
    EXPECT_EQ(rx_.r.pool.CheckInvariants(), "");
    EXPECT_TRUE(rx_.r.AllFree());
    EXPECT_EQ(rx_.server->connection_count(), 1u) << "the connection survived";
  }

  TcpReceiver rx_;
  Payload p_;
};

TEST_F(TcpHostileTest, TruncatedLayerFrame) {
  RunOnSharedConnection(TransferError::kMalformedFrame, [&](RawPeer& peer, const Expectation& e) {
    peer.Send(BeginBytes(e));
    auto f = LayerBytes(e.id, p_, 0, 0, kTokens);
    // Keep the frame well framed but cut its payload: tensor_bytes now exceeds what is there.
    f.resize(f.size() - 100);
    Poke(f, 8, f.size() - kFrameHeaderBytes, 4);
    peer.Send(f);
  });
}

TEST_F(TcpHostileTest, OverflowingTensorBytes) {
  RunOnSharedConnection(TransferError::kMalformedFrame, [&](RawPeer& peer, const Expectation& e) {
    peer.Send(BeginBytes(e));
    auto f = LayerBytes(e.id, p_, 0, 0, kTokens);
    Poke(f, kFrameHeaderBytes + 24, std::numeric_limits<uint64_t>::max(), 8);
    peer.Send(f);
  });
}

TEST_F(TcpHostileTest, OverflowingTokenRange) {
  RunOnSharedConnection(TransferError::kTokenRangeOutOfRange,
                        [&](RawPeer& peer, const Expectation& e) {
                          peer.Send(BeginBytes(e));
                          auto f = LayerBytes(e.id, p_, 0, 0, 4);
                          Poke(f, kFrameHeaderBytes + 16, ~uint64_t{0} - 2, 8);  // first_token
                          peer.Send(f);
                        });
}

TEST_F(TcpHostileTest, LayerIndexOutOfRange) {
  RunOnSharedConnection(TransferError::kLayerOutOfRange, [&](RawPeer& peer, const Expectation& e) {
    peer.Send(BeginBytes(e));
    auto f = LayerBytes(e.id, p_, 0, 0, kTokens);
    Poke(f, kFrameHeaderBytes + 8, 0xffffffffu, 4);
    peer.Send(f);
  });
}

TEST_F(TcpHostileTest, TokenRangePastTheTransfer) {
  RunOnSharedConnection(TransferError::kTokenRangeOutOfRange,
                        [&](RawPeer& peer, const Expectation& e) {
                          peer.Send(BeginBytes(e, kTokens));
                          const Payload big = MakePayload(kGeo, 2 * kTokens, DType::kF32, 1);
                          peer.Send(LayerBytes(e.id, big, 0, 0, 2 * kTokens));
                        });
}

TEST_F(TcpHostileTest, WrongToken) {
  RunOnSharedConnection(TransferError::kBadToken, [&](RawPeer& peer, const Expectation& e) {
    auto b = BeginBytes(e);
    b[kFrameHeaderBytes + 8] ^= std::byte{0x5a};
    peer.Send(b);
    peer.Send(LayerBytes(e.id, p_, 0, 0, kTokens));  // ignored: the transfer already ended
  });
}

TEST_F(TcpHostileTest, WrongFingerprint) {
  RunOnSharedConnection(TransferError::kFingerprintMismatch,
                        [&](RawPeer& peer, const Expectation& e) {
                          peer.Send(BeginBytes(e, kTokens, kFingerprint ^ 1));
                        });
}

TEST_F(TcpHostileTest, DuplicateLayer) {
  RunOnSharedConnection(TransferError::kDuplicateLayer, [&](RawPeer& peer, const Expectation& e) {
    peer.Send(BeginBytes(e));
    peer.Send(LayerBytes(e.id, p_, 1, 0, kTokens));
    peer.Send(LayerBytes(e.id, p_, 1, 0, kTokens));
  });
}

TEST_F(TcpHostileTest, MissingLayersThenEnd) {
  RunOnSharedConnection(TransferError::kIncomplete, [&](RawPeer& peer, const Expectation& e) {
    peer.Send(BeginBytes(e));
    peer.Send(LayerBytes(e.id, p_, 0, 0, kTokens));
    peer.Send(EndBytes(e.id));
  });
}

TEST_F(TcpHostileTest, ChecksumMismatch) {
  RunOnSharedConnection(TransferError::kChecksumMismatch, [&](RawPeer& peer, const Expectation& e) {
    peer.Send(BeginBytes(e));
    peer.Send(LayerBytes(e.id, p_, 0, 0, kTokens, /*corrupt=*/true));
  });
}

// The payload itself is damaged (the checksum field is intact) and arrives in odd pieces: the
// receiver has already put part of it in place when the checksum fails, and the whole transfer
// fails with it; the connection carries on.
TEST_F(TcpHostileTest, CorruptPayloadInAwkwardPiecesFailsItsTransfer) {
  RunOnSharedConnection(TransferError::kChecksumMismatch, [&](RawPeer& peer, const Expectation& e) {
    peer.Send(BeginBytes(e));
    peer.Send(LayerBytes(e.id, p_, 0, 0, kTokens));
    auto f = LayerBytes(e.id, p_, 1, 0, kTokens);
    f[f.size() - 77] ^= std::byte{0x04};  // in V
    SendInPieces(peer, f, kAwkwardPieces);
  });
}

// A LAYER for a transfer the receiver never had is read past (not buffered whole) and the
// frames after it are framed correctly.
TEST_F(TcpHostileTest, LargeLayerForAnUnknownTransferIsSkipped) {
  RunOnSharedConnection(TransferError::kChecksumMismatch, [&](RawPeer& peer, const Expectation& e) {
    const Payload big = MakePayload(kGeo, 4000, DType::kF32, 2);  // 500 KiB of K+V
    SendInPieces(peer, LayerBytes(999, big, 0, 0, 4000), {70001, 3});
    peer.Send(BeginBytes(e));
    peer.Send(LayerBytes(e.id, p_, 0, 0, kTokens, /*corrupt=*/true));
  });
  EXPECT_EQ(rx_.r.landing.Stats().unknown_frames, 1u);
}

// The decode side cancels while (or before) the payload streams in: the rest of the frame is
// dropped, the blocks come back, and the connection carries on.
TEST_F(TcpHostileTest, CancelMidPayloadDropsTheRestOfTheFrame) {
  RunOnSharedConnection(TransferError::kCancelledByReceiver,
                        [&](RawPeer& peer, const Expectation& e) {
                          peer.Send(BeginBytes(e));
                          auto f = LayerBytes(e.id, p_, 0, 0, kTokens);
                          const auto all = std::span<const std::byte>(f);
                          peer.Send(all.first(kLayerPrefixBytes + 100));
                          EXPECT_TRUE(rx_.r.landing.Cancel(e.id));
                          peer.Send(all.subspan(kLayerPrefixBytes + 100));
                          peer.Send(LayerBytes(e.id, p_, 1, 0, kTokens));  // late, ignored
                        });
}

// Every frame of a transfer split at odd sizes, received in place (same dtype) and through
// staging (conversion), lands bit-exact.
class TcpSplitFrameTest : public ::testing::TestWithParam<DType> {};

TEST_P(TcpSplitFrameTest, FramesSplitAtAwkwardSizesLandBitExact) {
  TcpReceiver rx(kGeo, 16, GetParam(), 64);
  constexpr int64_t kMany = 300;
  Expectation e = Expect(rx.r, 1, kMany, 5);
  const Payload p = MakePayload(kGeo, kMany, DType::kF32, 4);
  RawPeer peer(rx.server->port());
  peer.Handshake();
  std::vector<std::byte> stream = BeginBytes(e, kMany);
  auto append = [&](const std::vector<std::byte>& f) {
    stream.insert(stream.end(), f.begin(), f.end());
  };
  append(LayerBytes(e.id, p, 0, 0, 7));
  append(LayerBytes(e.id, p, 0, 7, 1));
  append(LayerBytes(e.id, p, 1, 0, kMany));
  append(LayerBytes(e.id, p, 0, 8, kMany - 8));
  append(EndBytes(e.id));
  SendInPieces(peer, stream, kAwkwardPieces);
  auto r = peer.ReadResult();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->reason, TransferError::kOk) << r->text;
  ASSERT_TRUE(e.Wait().status.ok());
  ExpectLanded(rx.r, e, p);
  rx.r.pool.Release(e.table);
  EXPECT_TRUE(rx.r.AllFree());
}

INSTANTIATE_TEST_SUITE_P(InPlaceAndStaged, TcpSplitFrameTest,
                         ::testing::Values(DType::kF32, DType::kBF16),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

TEST_F(TcpHostileTest, StalledTransferHitsItsDeadline) {
  RunOnSharedConnection(
      TransferError::kDeadlineExceeded,
      [&](RawPeer& peer, const Expectation& e) {
        peer.Send(BeginBytes(e));
        peer.Send(LayerBytes(e.id, p_, 0, 0, 8));  // then nothing more for this transfer
      },
      std::chrono::milliseconds(300));
}

TEST_F(TcpHostileTest, PeerStallingMidFrameOrDisconnectingMidLayer) {
  Expectation stall = Expect(rx_.r, 1, kTokens, 0, std::chrono::milliseconds(300));
  Expectation gone = Expect(rx_.r, 2, kTokens, 0);
  Expectation good = Expect(rx_.r, 3, kTokens, 0);
  RawPeer a(rx_.server->port()), b(rx_.server->port());
  a.Handshake();
  b.Handshake();
  // a: half a LAYER frame, then silence.
  a.Send(BeginBytes(stall));
  auto fa = LayerBytes(stall.id, p_, 0, 0, kTokens);
  a.Send(std::span<const std::byte>(fa).first(fa.size() / 2));
  // b: half a LAYER frame, then the socket closes.
  b.Send(BeginBytes(gone));
  auto fb = LayerBytes(gone.id, p_, 0, 0, kTokens);
  b.Send(std::span<const std::byte>(fb).first(fb.size() / 2));
  b.Close();
  // A well-behaved sender on its own connection is unaffected.
  auto client = MakeClient();
  AckCollector acks;
  auto t =
      client->Begin(SenderSpec(rx_.r, good, kTokens, DType::kF32, rx_.address()), acks.Callback());
  ASSERT_TRUE(t.ok());
  StreamPayload(**t, p_);
  ASSERT_TRUE(acks.Wait(good.id)->status.ok());

  EXPECT_EQ(gone.Wait().reason, TransferError::kPeerDisconnected);
  EXPECT_EQ(stall.Wait().reason, TransferError::kDeadlineExceeded);
  ASSERT_TRUE(good.Wait().status.ok());
  ExpectLanded(rx_.r, good, p_);
  for (auto* e : {&stall, &gone, &good}) rx_.r.pool.Release(e->table);
  EXPECT_TRUE(rx_.r.AllFree());
  EXPECT_EQ(rx_.r.pool.CheckInvariants(), "");
}

// Bytes that break framing close that connection only; its transfers end as malformed.
void ExpectFramingErrorClosesConnection(TcpReceiver& rx, const Payload& p,
                                        const std::vector<std::byte>& garbage) {
  Expectation bad = Expect(rx.r, 10, kTokens);
  Expectation good = Expect(rx.r, 11, kTokens);
  RawPeer peer(rx.server->port());
  peer.Handshake();
  peer.Send(BeginBytes(bad));
  peer.Send(LayerBytes(bad.id, p, 0, 0, kTokens));
  peer.Send(garbage);
  auto r = peer.ReadResult();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->transfer_id, 0u);  // about the connection
  EXPECT_EQ(r->reason, TransferError::kMalformedFrame);
  EXPECT_TRUE(peer.WaitClosed());
  EXPECT_EQ(bad.Wait().reason, TransferError::kMalformedFrame);

  auto client = MakeClient();
  AckCollector acks;
  auto t =
      client->Begin(SenderSpec(rx.r, good, kTokens, DType::kF32, rx.address()), acks.Callback());
  ASSERT_TRUE(t.ok());
  StreamPayload(**t, p);
  ASSERT_TRUE(acks.Wait(good.id)->status.ok());
  ASSERT_TRUE(good.Wait().status.ok());
  rx.r.pool.Release(bad.table);
  rx.r.pool.Release(good.table);
  EXPECT_TRUE(rx.r.AllFree());
}

TEST_F(TcpHostileTest, BadMagicClosesOnlyThatConnection) {
  std::vector<std::byte> garbage(32, std::byte{0x41});
  ExpectFramingErrorClosesConnection(rx_, p_, garbage);
}

TEST_F(TcpHostileTest, OversizeFrameLengthIsRefusedBeforeAllocating) {
  auto f = EndBytes(10);
  Poke(f, 8, 0xfffffff0u, 4);
  ExpectFramingErrorClosesConnection(rx_, p_, f);
}

TEST(TcpHandshakeTest, HelloIsRequiredAndAuthenticated) {
  KvLandingOptions lo;
  lo.hello_secret = "cluster-secret";
  auto so = testing::FastServerOptions();
  so.handshake_timeout = std::chrono::milliseconds(300);
  TcpReceiver rx(kGeo, 16, DType::kF32, 8, so, lo);
  Expectation e = Expect(rx.r, 1, kTokens);
  {
    RawPeer peer(rx.server->port());
    peer.Send(BeginBytes(e));  // no HELLO first
    auto r = peer.ReadResult();
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->reason, TransferError::kAuthFailed);
    EXPECT_TRUE(peer.WaitClosed());
  }
  {
    RawPeer peer(rx.server->port());
    HelloFrame h;
    h.auth = "wrong";
    peer.SendFrame(h);
    auto r = peer.ReadResult();
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->code, absl::StatusCode::kUnauthenticated);
    EXPECT_TRUE(peer.WaitClosed());
  }
  {
    RawPeer silent(rx.server->port());  // says nothing: closed after the handshake timeout
    EXPECT_TRUE(silent.WaitClosed(std::chrono::seconds(5)));
  }
  {
    RawPeer peer(rx.server->port());
    peer.Handshake("cluster-secret");
    peer.Send(BeginBytes(e));
    const Payload p = MakePayload(kGeo, kTokens, DType::kF32, 1);
    peer.Send(LayerBytes(e.id, p, 0, 0, kTokens));
    peer.Send(LayerBytes(e.id, p, 1, 0, kTokens));
    peer.Send(EndBytes(e.id));
    auto r = peer.ReadResult();
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->reason, TransferError::kOk);
  }
  ASSERT_TRUE(e.Wait().status.ok());
  rx.r.pool.Release(e.table);
  EXPECT_TRUE(rx.r.AllFree());
}

}  // namespace
}  // namespace tandem
