// TLS on the KV data plane: a self-signed certificate made at test time, verified by name.
#include <gtest/gtest.h>

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

const KvGeometry kGeo{3, 2, 8};

class TlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { cert_ = new testing::TestCert(testing::MakeSelfSignedCert()); }
  static void TearDownTestSuite() { delete cert_; }

  static KvServerOptions ServerOptions() {
    KvServerOptions o = testing::FastServerOptions();
    o.tls.enabled = true;
    o.tls.cert_chain_pem = cert_->cert_pem;
    o.tls.private_key_pem = cert_->key_pem;
    o.handshake_timeout = std::chrono::milliseconds(500);
    return o;
  }
  static KvClientOptions ClientOptions(std::string server_name) {
    KvClientOptions o;
    o.tls.enabled = true;
    o.tls.ca_pem = cert_->cert_pem;
    o.tls.server_name = std::move(server_name);
    o.connect_timeout = std::chrono::milliseconds(2000);
    return o;
  }

  static testing::TestCert* cert_;
};
testing::TestCert* TlsTest::cert_ = nullptr;

TEST_F(TlsTest, TransfersRoundTripOverTls) {
  TcpReceiver rx(kGeo, 16, DType::kF32, 32, ServerOptions());
  auto client = MakeClient(ClientOptions("localhost"));
  AckCollector acks;
  for (uint64_t id = 1; id <= 3; ++id) {
    const int64_t tokens = 10 * id + 7;
    Expectation e = Expect(rx.r, id, tokens);
    const Payload p = MakePayload(kGeo, tokens, DType::kBF16, static_cast<uint32_t>(id));
    auto t =
        client->Begin(SenderSpec(rx.r, e, tokens, DType::kBF16, rx.address()), acks.Callback());
    ASSERT_TRUE(t.ok());
    StreamPayload(**t, p, 5);
    auto ack = acks.Wait(id);
    ASSERT_TRUE(ack && ack->status.ok()) << (ack ? ack->status : absl::UnknownError(""));
    ASSERT_TRUE(e.Wait().status.ok());
    ExpectLanded(rx.r, e, p);
    rx.r.pool.Release(e.table);
  }
  EXPECT_TRUE(rx.r.AllFree());
}

TEST_F(TlsTest, WrongServerNameIsRefused) {
  TcpReceiver rx(kGeo, 16, DType::kF32, 8, ServerOptions());
  auto client = MakeClient(ClientOptions("kv.example.com"));
  AckCollector acks;
  Expectation e = Expect(rx.r, 1, 4);
  auto t = client->Begin(SenderSpec(rx.r, e, 4, DType::kF32, rx.address()), acks.Callback());
  ASSERT_TRUE(t.ok());
  auto ack = acks.Wait(1);
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(ack->reason, TransferError::kConnectFailed) << ack->status;
  rx.r.landing.Cancel(1);
  rx.r.pool.Release(e.table);
  EXPECT_TRUE(rx.r.AllFree());
}

TEST_F(TlsTest, PlainSenderCannotTalkToATlsReceiver) {
  TcpReceiver rx(kGeo, 16, DType::kF32, 8, ServerOptions());
  KvClientOptions co;
  co.connect_timeout = std::chrono::milliseconds(1000);
  auto client = MakeClient(co);
  AckCollector acks;
  Expectation e = Expect(rx.r, 1, 4);
  auto t = client->Begin(SenderSpec(rx.r, e, 4, DType::kF32, rx.address()), acks.Callback());
  ASSERT_TRUE(t.ok());
  auto ack = acks.Wait(1);
  ASSERT_TRUE(ack.has_value());
  EXPECT_FALSE(ack->status.ok());
  EXPECT_EQ(rx.r.landing.Stats().frames_received, 0u);
  rx.r.landing.Cancel(1);
  rx.r.pool.Release(e.table);
  EXPECT_TRUE(rx.r.AllFree());
}

TEST_F(TlsTest, BadServerKeyMaterialIsAnError) {
  testing::Receiver r(kGeo, 16, DType::kF32, 4);
  KvServerOptions o = ServerOptions();
  o.tls.private_key_pem = "not a key";
  EXPECT_FALSE(KvServer::Start(r.landing, o).ok());
}

}  // namespace
}  // namespace tandem
