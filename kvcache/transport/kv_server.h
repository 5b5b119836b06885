// KV data-plane receiver over TCP (decode worker): accepts sender connections, frames the byte
// stream, and hands each frame to a KvLanding. Optional TLS. Asio stays in the .cc.
//
// One connection carries many transfers. A frame that is well framed but wrong ends only the
// transfer it names; a stream that loses framing (bad header, oversize frame) or breaks the
// protocol is closed, and only the transfers bound to it end (kPeerDisconnected).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kvcache/kv_landing.h"
#include "kvcache/transport/tls.h"
#include "kvcache/wire_format.h"

namespace tandem {

struct KvServerOptions {
  std::string bind_address = "127.0.0.1";  // explicit; loopback by default
  uint16_t port = 0;                       // 0: pick a free port (see KvServer::port())
  int io_threads = 1;
  uint32_t max_frame_bytes = kDefaultMaxFrameBytes;
  std::chrono::milliseconds handshake_timeout{5000};  // connect to HELLO (TLS included)
  std::chrono::milliseconds write_timeout{5000};      // a sender that stops reading RESULTs
  std::chrono::milliseconds reap_interval{50};        // how often deadlines are enforced
  KvTlsServerOptions tls;
};

class KvServer {
 public:
  // Binds and starts serving. `landing` must outlive the server.
  static absl::StatusOr<std::unique_ptr<KvServer>> Start(KvLanding& landing,
                                                         KvServerOptions options);
  // Stop()s.
  ~KvServer();
  KvServer(const KvServer&) = delete;
  KvServer& operator=(const KvServer&) = delete;

  uint16_t port() const;
  std::string address() const;  // "host:port" as bound
  size_t connection_count() const;
  // Closes the listener and every connection (their streaming transfers end with
  // kPeerDisconnected) and joins the I/O threads. Idempotent. Must not be called from a landing
  // callback (those run on the server's I/O threads).
  void Stop();

  class Impl;

 private:
  explicit KvServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tandem
