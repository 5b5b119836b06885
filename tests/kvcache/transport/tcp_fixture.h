// A receiver served over loopback TCP, and a sender client, for transport tests.
#pragma once

#include <memory>
#include <string>

#include "kvcache/transport/kv_client.h"
#include "kvcache/transport/kv_server.h"
#include "tests/kvcache/kv_test_util.h"

namespace tandem::testing {

inline KvServerOptions FastServerOptions() {
  KvServerOptions o;
  o.bind_address = "127.0.0.1";
  o.port = 0;
  o.reap_interval = std::chrono::milliseconds(10);
  o.handshake_timeout = std::chrono::milliseconds(2000);
  o.write_timeout = std::chrono::milliseconds(2000);
  return o;
}

struct TcpReceiver {
  TcpReceiver(const KvGeometry& g, int32_t block_size, DType dtype, int32_t blocks,
              KvServerOptions options = FastServerOptions(), KvLandingOptions landing = {})
      : r(g, block_size, dtype, blocks, std::move(landing)) {
    auto s = KvServer::Start(r.landing, std::move(options));
    EXPECT_TRUE(s.ok()) << s.status();
    if (s.ok()) server = std::move(*s);
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(server->port()); }

  Receiver r;
  std::unique_ptr<KvServer> server;  // destroyed before the landing
};

inline std::unique_ptr<KvClient> MakeClient(KvClientOptions o = {}) {
  auto c = KvClient::Create(std::move(o));
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? std::move(*c) : nullptr;
}

// Streams every layer of `p` (in slices of `slice_tokens`) and finishes.
inline void StreamPayload(OutgoingTransfer& t, const Payload& p, int64_t slice_tokens = 0) {
  if (slice_tokens <= 0) slice_tokens = p.tokens;
  const uint64_t tb = p.token_bytes();
  for (int64_t first = 0; first < p.tokens; first += slice_tokens) {
    const int64_t n = std::min(slice_tokens, p.tokens - first);
    for (int l = 0; l < p.geometry.num_layers; ++l) {
      LayerSlice s;
      s.layer = l;
      s.first_token = first;
      s.token_count = n;
      s.k = p.layers[l].k.data() + first * tb;
      s.v = p.layers[l].v.data() + first * tb;
      s.dtype = p.dtype;
      absl::Status st = t.SendLayer(std::move(s));
      ASSERT_TRUE(st.ok()) << st;
    }
  }
  absl::Status st = t.Finish(7, -0.5f);
  ASSERT_TRUE(st.ok()) << st;
}

}  // namespace tandem::testing
