// KV data-plane sender over TCP (prefill worker): a KvSender with a connection pool per peer.
// Many transfers share a connection; their frames are written scatter-gather (frame prefix, then
// K and V straight from the caller's buffers). Asio stays in the .cc.
//
// Backpressure: each connection bounds the bytes it has queued but not yet written
// (max_inflight_bytes) and the frames it queues (max_queued_frames); SendLayer blocks while over
// the bound, at most until the write timeout or the transfer deadline, then fails the transfer
// with kWriteTimeout. A write that makes no progress for write_timeout closes the connection
// (a receiver that stops reading blocks nobody else).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kvcache/kv_sender.h"
#include "kvcache/transport/tls.h"

namespace tandem {

struct KvClientOptions {
  int io_threads = 1;
  int connections_per_peer = 1;
  uint64_t max_frame_payload_bytes = 2u << 20;      // K+V bytes per LAYER frame
  uint64_t max_inflight_bytes = 64u << 20;          // per connection
  size_t max_queued_frames = 1024;                  // per connection
  std::chrono::milliseconds connect_timeout{5000};  // TCP + TLS + HELLO exchange
  std::chrono::milliseconds write_timeout{5000};
  uint64_t incarnation_id = 0;  // our HELLO: a restarted prefill worker is a new sender
  std::string auth;             // HELLO auth (the receiver's hello_secret)
  KvTlsClientOptions tls;
};

struct KvClientStats {
  uint64_t bytes_sent = 0;  // frame bytes handed to the kernel
  uint64_t frames_sent = 0;
  uint64_t connections_opened = 0;
  uint64_t late_results = 0;  // RESULTs for transfers already completed locally
};

class KvClient final : public KvSender {
 public:
  static absl::StatusOr<std::unique_ptr<KvClient>> Create(KvClientOptions options = {});
  // Transfers still running end with kShutdown; joins the I/O threads.
  ~KvClient() override;
  KvClient(const KvClient&) = delete;
  KvClient& operator=(const KvClient&) = delete;

  // spec.peer is "host:port". If Begin returns an error, on_done is never called. The returned
  // OutgoingTransfer must be destroyed before this client.
  absl::StatusOr<std::unique_ptr<OutgoingTransfer>> Begin(const OutgoingTransferSpec& spec,
                                                          TransferAckCallback on_done) override;

  // Open connections to `peer` (for tests and metrics).
  size_t connection_count(const std::string& peer) const;
  KvClientStats Stats() const;

  class Impl;

 private:
  explicit KvClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tandem
