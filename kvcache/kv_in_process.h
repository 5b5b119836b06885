// In-process KV transport: a KvSender that feeds a KvLanding in the same process directly (no
// sockets), through the same frames, validation and checksums as the network path. Used by
// `tandem serve` and engine-only builds.
//
// Frames are applied synchronously on the caller's thread: SendLayer returns once the slice has
// been verified and written into the landing's store (so its buffers are free on return), and
// on_done typically fires inside Finish or Abort.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "kvcache/kv_landing.h"
#include "kvcache/kv_sender.h"

namespace tandem {

struct InProcessKvSenderOptions {
  uint64_t max_frame_payload_bytes = 4u << 20;  // K+V bytes per LAYER frame
  uint64_t incarnation_id = 0;                  // our HELLO
  std::string auth;                             // HELLO auth (the landing's hello_secret)
};

class InProcessKvSender final : public KvSender {
 public:
  // `landing` must outlive this sender.
  explicit InProcessKvSender(KvLanding& landing, InProcessKvSenderOptions options = {});
  // Transfers still streaming end as if the connection closed (kPeerDisconnected).
  ~InProcessKvSender() override;

  // If Begin returns an error, on_done is never called.
  absl::StatusOr<std::unique_ptr<OutgoingTransfer>> Begin(const OutgoingTransferSpec& spec,
                                                          TransferAckCallback on_done) override;

  class Channel;  // implementation detail (kv_in_process.cc)

 private:
  KvLanding& landing_;
  const InProcessKvSenderOptions options_;
  std::shared_ptr<Channel> channel_;
  PeerId peer_ = 0;
  absl::Status hello_status_;
};

}  // namespace tandem
