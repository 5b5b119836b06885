// Sender side of the KV data plane (prefill worker), independent of the transport: a layer-wise
// streaming API. Implementations: InProcessKvSender (kvcache/kv_in_process.h) and the TCP
// KvClient (kvcache/transport/kv_client.h).
//
// Usage on the prefill side:
//   auto t = sender.Begin(spec, on_done);           // after the landing ticket arrived
//   for each layer l, as soon as it is computed:
//     t->SendLayer(l, k_ptr, v_ptr, dtype, keep_alive);  // returns while later layers compute
//   t->Finish(first_token, logprob);                 // or t->Abort(reason, text)
//   on_done(ack) fires once with the receiver's RESULT (or a local failure).
//
// Buffer lifetime contract for SendLayer: the bytes at k/v are read after SendLayer returns
// (scatter-gather, straight from the caller's buffers, no copy). The sender holds `keep_alive`
// until it no longer reads them (written to the socket, or the transfer ended) and then drops
// it; the caller must keep k/v valid and unmodified while `keep_alive` is alive. Passing a null
// keep_alive means: valid and unmodified until on_done has fired.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvcache/dtype.h"
#include "kvcache/kv_store.h"
#include "kvcache/wire_format.h"

namespace tandem {

// What the landing ticket (from the decode worker) and the local model say about a transfer.
struct OutgoingTransferSpec {
  std::string peer;  // transport address: "host:port" for TCP; ignored in-process
  uint64_t transfer_id = 0;
  TransferToken token{};
  uint64_t model_fingerprint = 0;
  KvGeometry geometry;
  DType dtype = DType::kBF16;  // dtype of every K/V buffer handed to SendLayer
  int64_t token_count = 0;
  int64_t start_position = 0;
  std::chrono::steady_clock::time_point deadline = std::chrono::steady_clock::time_point::max();
  // The decode worker incarnation the ticket names; 0 skips the check.
  uint64_t receiver_incarnation = 0;
};

// The end of a transfer as the sender sees it: the receiver's RESULT, or a local failure
// (connection lost, write timeout, deadline).
struct TransferAck {
  uint64_t transfer_id = 0;
  absl::Status status;
  TransferError reason = TransferError::kOk;
};
using TransferAckCallback = std::function<void(const TransferAck&)>;

// A token range of one layer, canonical layout [token_count][kv_heads][head_dim] of `dtype`.
struct LayerSlice {
  int32_t layer = 0;
  int64_t first_token = 0;  // relative to the transfer
  int64_t token_count = 0;
  const void* k = nullptr;
  const void* v = nullptr;
  DType dtype = DType::kBF16;
  std::shared_ptr<const void> keep_alive;  // see the buffer lifetime contract above
};

class OutgoingTransfer {
 public:
  // Destroying a transfer that was neither finished nor aborted aborts it. on_done still fires.
  virtual ~OutgoingTransfer() = default;

  // Queues one slice; within a layer, slices must come in token order without gaps. Layers may
  // interleave. Blocks while the connection's in-flight bytes are over their bound
  // (backpressure), at most until the write timeout or the transfer's deadline. Returns the
  // transfer's failure once it has ended. Must not be called from a transport I/O thread.
  virtual absl::Status SendLayer(LayerSlice slice) = 0;
  // The whole token range of one layer.
  absl::Status SendLayer(int32_t layer, const void* k, const void* v, DType dtype,
                         std::shared_ptr<const void> keep_alive = nullptr);
  // Sends END with the first sampled token. Every layer must be complete.
  virtual absl::Status Finish(int32_t first_token, float logprob) = 0;
  // Sends ABORT; on_done fires when the receiver acknowledges (or the connection ends).
  virtual void Abort(TransferError reason, std::string_view text) = 0;

  virtual uint64_t transfer_id() const = 0;
  virtual int64_t token_count() const = 0;
};

class KvSender {
 public:
  virtual ~KvSender() = default;
  // Starts a transfer (sends BEGIN). `on_done` fires exactly once, on a transport thread or, for
  // failures detected synchronously, on the caller's thread; it must not block.
  virtual absl::StatusOr<std::unique_ptr<OutgoingTransfer>> Begin(const OutgoingTransferSpec& spec,
                                                                  TransferAckCallback on_done) = 0;
};

namespace internal {

// Sender-side bookkeeping shared by transports: validates the spec and every slice against it,
// and tracks which layers are complete. Not thread-safe (one per transfer, under its owner's
// lock).
class SendSequencer {
 public:
  static absl::Status ValidateSpec(const OutgoingTransferSpec& spec);
  explicit SendSequencer(const OutgoingTransferSpec& spec);

  // Checks `slice` and records it as sent.
  absl::Status Accept(const LayerSlice& slice);
  // OK when every layer covers every token.
  absl::Status CheckComplete() const;
  // Bytes of one token's K (or V).
  uint64_t token_bytes() const { return token_bytes_; }

 private:
  KvGeometry geometry_;
  DType dtype_;
  int64_t token_count_;
  uint64_t token_bytes_;
  std::vector<int64_t> next_token_;
  int32_t layers_complete_ = 0;
};

// How ForEachLayerFrame fills LayerFrame::checksum.
enum class FrameChecksum {
  kCompute,   // LayerChecksum(k, v), on the calling thread
  kDeferred,  // left 0: the caller computes it later (e.g. its I/O thread, just before the
              // payload is written, while the kernel copy is about to read the same bytes)
};

// Splits a slice into LAYER frames whose K+V payload is at most `max_payload_bytes` (but at least
// one token) and calls fn(const LayerFrame&) -> bool for each, checksum filled in as `checksum`
// says. Stops early and returns false when fn returns false.
template <typename Fn>
bool ForEachLayerFrame(uint64_t transfer_id, const LayerSlice& slice, uint64_t token_bytes,
                       uint64_t max_payload_bytes, FrameChecksum checksum, Fn&& fn) {
  const int64_t per_frame = static_cast<int64_t>(
      std::max<uint64_t>(1, max_payload_bytes / std::max<uint64_t>(1, 2 * token_bytes)));
  const auto* k = static_cast<const std::byte*>(slice.k);
  const auto* v = static_cast<const std::byte*>(slice.v);
  for (int64_t done = 0; done < slice.token_count;) {
    const int64_t n = std::min(per_frame, slice.token_count - done);
    LayerFrame f;
    f.transfer_id = transfer_id;
    f.layer = static_cast<uint32_t>(slice.layer);
    f.first_token = static_cast<uint64_t>(slice.first_token + done);
    f.token_count = static_cast<uint32_t>(n);
    f.k = std::span<const std::byte>(k + done * token_bytes, n * token_bytes);
    f.v = std::span<const std::byte>(v + done * token_bytes, n * token_bytes);
    f.checksum = checksum == FrameChecksum::kCompute ? LayerChecksum(f.k, f.v) : 0;
    if (!fn(f)) return false;
    done += n;
  }
  return true;
}

template <typename Fn>
bool ForEachLayerFrame(uint64_t transfer_id, const LayerSlice& slice, uint64_t token_bytes,
                       uint64_t max_payload_bytes, Fn&& fn) {
  return ForEachLayerFrame(transfer_id, slice, token_bytes, max_payload_bytes,
                           FrameChecksum::kCompute, std::forward<Fn>(fn));
}

}  // namespace internal
}  // namespace tandem
