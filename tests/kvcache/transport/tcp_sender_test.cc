// Sender-side behaviour over TCP: cancellation from either side (acknowledged), deadlines, a
// receiver that stops reading, connection failures, incarnation and auth checks.
#include <gtest/gtest.h>

#include <thread>

#include "tests/kvcache/transport/tcp_fixture.h"
#include "tests/kvcache/transport/transport_test_util.h"

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
namespace asio = boost::asio;

const KvGeometry kGeo{2, 2, 8};

TEST(TcpSenderTest, ReceiverCancellationReachesTheSender) {
  TcpReceiver rx(kGeo, 16, DType::kF32, 16);
  auto client = MakeClient();
  AckCollector acks;
  Expectation e = Expect(rx.r, 1, 32);
  const Payload p = MakePayload(kGeo, 32, DType::kF32, 1);
  auto t = client->Begin(SenderSpec(rx.r, e, 32, DType::kF32, rx.address()), acks.Callback());
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE((*t)->SendLayer(0, p.layers[0].k.data(), p.layers[0].v.data(), DType::kF32).ok());
  EXPECT_TRUE(rx.r.landing.Cancel(1));  // the client went away on the decode side
  EXPECT_EQ(e.Wait().reason, TransferError::kCancelledByReceiver);
  auto ack = acks.Wait(1);
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(ack->reason, TransferError::kCancelledByReceiver);
  EXPECT_EQ(ack->status.code(), absl::StatusCode::kCancelled);
  EXPECT_FALSE((*t)->SendLayer(1, p.layers[1].k.data(), p.layers[1].v.data(), DType::kF32).ok());
  rx.r.pool.Release(e.table);
  EXPECT_TRUE(rx.r.AllFree());
}

TEST(TcpSenderTest, SenderAbortIsAcknowledged) {
  TcpReceiver rx(kGeo, 16, DType::kF32, 16);
  auto client = MakeClient();
  AckCollector acks;
  Expectation e = Expect(rx.r, 1, 32);
  Expectation other = Expect(rx.r, 2, 32);
  const Payload p = MakePayload(kGeo, 32, DType::kF32, 1);
  auto t = client->Begin(SenderSpec(rx.r, e, 32, DType::kF32, rx.address()), acks.Callback());
  auto t2 = client->Begin(SenderSpec(rx.r, other, 32, DType::kF32, rx.address()), acks.Callback());
  ASSERT_TRUE(t.ok() && t2.ok());
  ASSERT_TRUE((*t)->SendLayer(0, p.layers[0].k.data(), p.layers[0].v.data(), DType::kF32).ok());
  (*t)->Abort(TransferError::kAbortedBySender, "prefill worker draining");
  auto ack = acks.Wait(1);
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(ack->reason, TransferError::kAbortedBySender);  // the receiver's acknowledgement
  EXPECT_EQ(e.Wait().reason, TransferError::kAbortedBySender);
  StreamPayload(**t2, p);  // the other transfer on the connection is unaffected
  ASSERT_TRUE(acks.Wait(2)->status.ok());
  ASSERT_TRUE(other.Wait().status.ok());
  ExpectLanded(rx.r, other, p);
  rx.r.pool.Release(e.table);
  rx.r.pool.Release(other.table);
  EXPECT_TRUE(rx.r.AllFree());
}

TEST(TcpSenderTest, AbandonedTransferIsAborted) {
  TcpReceiver rx(kGeo, 16, DType::kF32, 16);
  auto client = MakeClient();
  AckCollector acks;
  Expectation e = Expect(rx.r, 1, 32);
  {
    auto t = client->Begin(SenderSpec(rx.r, e, 32, DType::kF32, rx.address()), acks.Callback());
    ASSERT_TRUE(t.ok());
  }
  EXPECT_EQ(e.Wait().reason, TransferError::kAbortedBySender);
  EXPECT_EQ(acks.Wait(1)->reason, TransferError::kAbortedBySender);
  rx.r.pool.Release(e.table);
  EXPECT_TRUE(rx.r.AllFree());
}

TEST(TcpSenderTest, SenderDeadlineAbortsTheTransfer) {
  TcpReceiver rx(kGeo, 16, DType::kF32, 16);
  auto client = MakeClient();
  AckCollector acks;
  Expectation e = Expect(rx.r, 1, 32);
  auto spec = SenderSpec(rx.r, e, 32, DType::kF32, rx.address());
  spec.deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
  auto t = client->Begin(spec, acks.Callback());
  ASSERT_TRUE(t.ok());
  const Payload p = MakePayload(kGeo, 32, DType::kF32, 1);
  ASSERT_TRUE((*t)->SendLayer(0, p.layers[0].k.data(), p.layers[0].v.data(), DType::kF32).ok());
  // Layer 1 never comes.
  auto ack = acks.Wait(1);
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(ack->reason, TransferError::kDeadlineExceeded);
  const LandingOutcome o = e.Wait();  // the sender's ABORT reached the receiver
  EXPECT_EQ(o.reason, TransferError::kAbortedBySender) << o.status;
  rx.r.pool.Release(e.table);
  EXPECT_TRUE(rx.r.AllFree());
}

// A "receiver" that completes the handshake and then never reads again.
class StalledReceiver {
 public:
  StalledReceiver()
      : acceptor_(io_, asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0)) {
    port_ = acceptor_.local_endpoint().port();
    thread_ = std::thread([this] {
      boost::system::error_code ec;
      acceptor_.accept(socket_, ec);
      if (ec) return;
      std::vector<std::byte> hello(kFrameHeaderBytes + kHelloFixedBytes);
      asio::read(socket_, asio::buffer(hello.data(), hello.size()), ec);
      HelloFrame reply;
      reply.role = PeerRole::kReceiver;
      std::vector<std::byte> out(EncodedSize(reply));
      Encode(reply, out);
      asio::write(socket_, asio::buffer(out.data(), out.size()), ec);
      // ...and now stop reading.
    });
  }
  ~StalledReceiver() {
    thread_.join();
    boost::system::error_code ec;
    socket_.close(ec);
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

 private:
  asio::io_context io_;
  asio::ip::tcp::acceptor acceptor_;
  asio::ip::tcp::socket socket_{io_};
  uint16_t port_ = 0;
  std::thread thread_;
};

TEST(TcpSenderTest, ReceiverThatStopsReadingHitsTheWriteTimeoutAndBlocksNobodyElse) {
  StalledReceiver stalled;
  TcpReceiver rx(kGeo, 16, DType::kF32, 16);
  KvClientOptions co;
  co.write_timeout = std::chrono::milliseconds(300);
  co.max_inflight_bytes = 4u << 20;
  auto client = MakeClient(co);
  AckCollector acks;
  // 64 MiB towards the stalled peer: far more than the socket buffers hold.
  const KvGeometry big{1, 8, 128};
  const int64_t tokens = 16384;
  auto data = std::make_shared<std::vector<std::byte>>(tokens * big.token_elems() * 2);
  OutgoingTransferSpec s;
  s.peer = stalled.address();
  s.transfer_id = 77;
  s.geometry = big;
  s.dtype = DType::kBF16;
  s.token_count = tokens;
  s.deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  auto t = client->Begin(s, acks.Callback());
  ASSERT_TRUE(t.ok());
  absl::Status send = absl::OkStatus();
  std::thread prefill([&] {
    for (int rep = 0; rep < 16 && send.ok(); ++rep) {
      LayerSlice sl;
      sl.layer = 0;
      sl.first_token = rep * 1024;
      sl.token_count = 1024;
      sl.k = data->data();
      sl.v = data->data();
      sl.dtype = DType::kBF16;
      sl.keep_alive = data;
      send = (*t)->SendLayer(sl);
    }
  });
  // Meanwhile a transfer to a healthy receiver through the same client completes.
  Expectation e = Expect(rx.r, 1, 32);
  const Payload p = MakePayload(kGeo, 32, DType::kF32, 1);
  auto good = client->Begin(SenderSpec(rx.r, e, 32, DType::kF32, rx.address()), acks.Callback());
  ASSERT_TRUE(good.ok());
  StreamPayload(**good, p);
  ASSERT_TRUE(acks.Wait(1)->status.ok());
  ASSERT_TRUE(e.Wait().status.ok());

  auto ack = acks.Wait(77);
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(ack->reason, TransferError::kWriteTimeout) << ack->status;
  prefill.join();
  EXPECT_FALSE(send.ok());
  rx.r.pool.Release(e.table);
  EXPECT_TRUE(rx.r.AllFree());
}

TEST(TcpSenderTest, ConnectFailureEndsTheTransfer) {
  uint16_t port = 0;
  {
    asio::io_context io;
    asio::ip::tcp::acceptor a(io, asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
    port = a.local_endpoint().port();
  }  // closed: nothing listens there now
  auto client = MakeClient();
  AckCollector acks;
  OutgoingTransferSpec s;
  s.peer = "127.0.0.1:" + std::to_string(port);
  s.transfer_id = 5;
  s.geometry = kGeo;
  s.token_count = 4;
  auto t = client->Begin(s, acks.Callback());
  ASSERT_TRUE(t.ok());
  auto ack = acks.Wait(5);
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(ack->reason, TransferError::kConnectFailed);
  EXPECT_FALSE(client
                   ->Begin(
                       [&] {
                         auto x = s;
                         x.peer = "no-port";
                         return x;
                       }(),
                       nullptr)
                   .ok());
}

TEST(TcpSenderTest, WrongReceiverIncarnationGetsNoData) {
  KvLandingOptions lo;
  lo.incarnation_id = 5;
  TcpReceiver rx(kGeo, 16, DType::kF32, 16, testing::FastServerOptions(), lo);
  auto client = MakeClient();
  AckCollector acks;
  Expectation e = Expect(rx.r, 1, 8);
  auto spec = SenderSpec(rx.r, e, 8, DType::kF32, rx.address());
  spec.receiver_incarnation = 4;  // the ticket was issued by the previous incarnation
  auto t = client->Begin(spec, acks.Callback());
  if (t.ok()) {
    auto ack = acks.Wait(1);
    ASSERT_TRUE(ack.has_value());
    EXPECT_EQ(ack->reason, TransferError::kIncarnationMismatch);
  } else {
    EXPECT_EQ(t.status().code(), absl::StatusCode::kFailedPrecondition);
  }
  // A matching ticket on the same connection works.
  Expectation e2 = Expect(rx.r, 2, 8);
  auto spec2 = SenderSpec(rx.r, e2, 8, DType::kF32, rx.address());
  spec2.receiver_incarnation = 5;
  auto t2 = client->Begin(spec2, acks.Callback());
  ASSERT_TRUE(t2.ok());
  const Payload p2 = MakePayload(kGeo, 8, DType::kF32, 2);  // alive until the ack (no keep-alive)
  StreamPayload(**t2, p2);
  auto ack2 = acks.Wait(2);
  ASSERT_TRUE(ack2 && ack2->status.ok()) << (ack2 ? ack2->status : absl::UnknownError(""));
  EXPECT_EQ(rx.r.landing.Stats().frames_received, 4u) << "nothing of transfer 1 arrived";
  EXPECT_TRUE(rx.r.landing.Cancel(1));
  rx.r.pool.Release(e.table);
  rx.r.pool.Release(e2.table);
  EXPECT_TRUE(rx.r.AllFree());
}

TEST(TcpSenderTest, WrongHelloSecretFailsTheTransfers) {
  KvLandingOptions lo;
  lo.hello_secret = "right";
  TcpReceiver rx(kGeo, 16, DType::kF32, 16, testing::FastServerOptions(), lo);
  KvClientOptions co;
  co.auth = "wrong";
  auto client = MakeClient(co);
  AckCollector acks;
  Expectation e = Expect(rx.r, 1, 8);
  auto t = client->Begin(SenderSpec(rx.r, e, 8, DType::kF32, rx.address()), acks.Callback());
  ASSERT_TRUE(t.ok());
  auto ack = acks.Wait(1);
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(ack->reason, TransferError::kAuthFailed) << ack->status;
  EXPECT_TRUE(rx.r.landing.Cancel(1));
  rx.r.pool.Release(e.table);
  EXPECT_TRUE(rx.r.AllFree());
}

TEST(TcpSenderTest, ReceiverShutdownEndsTransfersOnBothSides) {
  auto rx = std::make_unique<TcpReceiver>(kGeo, 16, DType::kF32, 16);
  auto client = MakeClient();
  AckCollector acks;
  Expectation e = Expect(rx->r, 1, 8);
  auto t = client->Begin(SenderSpec(rx->r, e, 8, DType::kF32, rx->address()), acks.Callback());
  ASSERT_TRUE(t.ok());
  const Payload p = MakePayload(kGeo, 8, DType::kF32, 1);
  ASSERT_TRUE((*t)->SendLayer(0, p.layers[0].k.data(), p.layers[0].v.data(), DType::kF32).ok());
  // A second transfer on the same connection completes: frames are applied in order, so the
  // first one's BEGIN and layer 0 have been applied too.
  Expectation e2 = Expect(rx->r, 2, 8);
  auto t2 = client->Begin(SenderSpec(rx->r, e2, 8, DType::kF32, rx->address()), acks.Callback());
  ASSERT_TRUE(t2.ok());
  StreamPayload(**t2, p);
  ASSERT_TRUE(acks.Wait(2)->status.ok());
  ASSERT_TRUE(e2.Wait().status.ok());
  rx->r.pool.Release(e2.table);
  rx->server->Stop();
  const LandingOutcome o = e.Wait();
  EXPECT_TRUE(o.reason == TransferError::kPeerDisconnected) << o.status;
  auto ack = acks.Wait(1);
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(ack->reason, TransferError::kPeerDisconnected);
  rx->r.pool.Release(e.table);
  EXPECT_TRUE(rx->r.AllFree());
}

}  // namespace
}  // namespace tandem
