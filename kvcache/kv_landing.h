// Receiver side of the KV data plane, independent of any transport: expected transfers, frame
// validation, checksum verification, layout conversion into the local KvStore, and the reclaim
// path for every way a transfer can end.
//
// Lifecycle of a transfer (DESIGN §4, §9):
//   ExpectTransfer (decode side, blocks already reserved)  -> kExpected
//   BEGIN from a peer with the right token/fingerprint/layout -> kStreaming (bound to that peer)
//   LAYER* (validated, checksum verified, then written)     -> still kStreaming
//   END once every layer x token range arrived              -> done: callback OK, RESULT OK
// Anything else ends the transfer with a TransferError: callback with that status, RESULT to the
// bound peer, and the landing's block references released once no write is in flight.
//
// Block ownership: ExpectTransfer takes the landing's OWN reference on the blocks the transfer
// writes (BlockPool::Retain). The caller keeps its reference and may release it at any time, even
// while a layer is being written; the blocks return to the pool only when both have let go.
//
// Thread-safety: every method may be called from any thread. Transports call OnFrame for one
// peer from one thread at a time (frames of a connection are applied in order). Completion
// callbacks run on the thread that ended the transfer, with no landing lock held; they may call
// back into the landing.
//
// Two ways in for LAYER payloads: OnFrame takes a whole frame from the transport's buffer and
// verifies its checksum before anything reaches the store. BeginLayer/FinishLayer (IncomingLayer)
// let a transport read the payload straight into the transfer's reserved blocks and verify it
// piecewise as it arrives, with no frame buffer and no second copy; see BeginLayer for why
// writing before verification keeps DESIGN §9's rule that unverified KV is never committed.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "kvcache/block_pool.h"
#include "kvcache/kv_store.h"
#include "kvcache/wire_format.h"

namespace tandem {

using KvClock = std::chrono::steady_clock;
// Identifies one connection (or in-process channel) as the landing sees it.
using PeerId = uint64_t;

// How a transfer ended, as the decode side sees it.
struct LandingOutcome {
  uint64_t transfer_id = 0;
  absl::Status status;  // OK, or TransferStatus(reason, detail)
  TransferError reason = TransferError::kOk;
  int32_t first_token = 0;  // from END; valid when status is OK
  float first_logprob = 0.0f;
  std::vector<BlockId> block_table;      // the table given to ExpectTransfer; filled when OK
  uint64_t bytes_received = 0;           // K+V payload bytes written
  std::chrono::nanoseconds duration{0};  // ExpectTransfer to end
};
using LandingCallback = std::function<void(const LandingOutcome&)>;

struct ExpectedTransfer {
  uint64_t transfer_id = 0;  // unique among this landing's live transfers; 0 is reserved
  TransferToken token{};     // one-time; the sender must present it in BEGIN
  uint64_t model_fingerprint = 0;
  KvGeometry geometry;         // must equal the store's geometry
  int64_t token_count = 0;     // tokens the sender will send
  int64_t start_position = 0;  // sequence position of the first transferred token
  // The sequence's block table; must cover [start_position, start_position + token_count). The
  // caller holds a reference on every block (reserved before the transfer).
  std::vector<BlockId> block_table;
  KvClock::time_point deadline;
  LandingCallback on_done;  // fires exactly once
};

// Receives RESULT frames the landing addresses to one peer. Implementations queue the frame and
// return; they must not call into the landing synchronously. `frame.text` is valid only during
// the call.
class ResultSink {
 public:
  virtual ~ResultSink() = default;
  virtual void SendResult(const ResultFrame& frame) = 0;
};

struct LandingStats {
  uint64_t bytes_received = 0;  // verified K+V bytes written into the store
  uint64_t frames_received = 0;
  uint64_t transfers_expected = 0;
  uint64_t transfers_ok = 0;
  uint64_t transfers_failed = 0;
  uint64_t failed_by_reason[kNumTransferErrors] = {};
  uint64_t late_frames = 0;     // frames for a transfer that already ended (counted, ignored)
  uint64_t unknown_frames = 0;  // frames for a transfer this landing never had
  uint64_t foreign_frames = 0;  // frames for a transfer bound to another peer
  uint64_t active_transfers = 0;
  std::chrono::nanoseconds total_ok_transfer_time{0};
};

class IncomingLayer;

struct KvLandingOptions {
  uint64_t incarnation_id = 0;  // sent in our HELLO; a restarted worker gets a new one
  std::string hello_secret;     // when non-empty, a sender's HELLO auth must equal it
  size_t tombstones = 4096;     // ended transfer ids remembered to answer late frames
  // Called after every transfer ends (after on_done), e.g. to feed histograms.
  std::function<void(const LandingOutcome&)> observer;
};

class KvLanding {
 public:
  KvLanding(BlockPool& pool, KvStore& store, KvLandingOptions options = {});
  // Ends every live transfer with kShutdown (callbacks fire) and releases its references. Writes
  // in flight must have returned: destroy transports first.
  ~KvLanding();
  KvLanding(const KvLanding&) = delete;
  KvLanding& operator=(const KvLanding&) = delete;

  // Registers a transfer. Fails (and changes nothing) on a duplicate or zero id, a geometry that
  // differs from the store's, a table that does not cover the range, or a block not currently
  // held by the caller.
  absl::Status ExpectTransfer(ExpectedTransfer spec);
  // Decode side gave up (client gone, its own deadline): ends the transfer with
  // kCancelledByReceiver. Returns false when the transfer already ended (counted as late).
  bool Cancel(uint64_t transfer_id);
  // Ends transfers whose deadline is <= now with kDeadlineExceeded; returns how many.
  int ReapExpired(KvClock::time_point now);
  std::optional<KvClock::time_point> NextDeadline() const;

  // ---- Transport side ----
  // A new connection; frames from it carry the returned id. The sink receives its RESULTs.
  PeerId AttachPeer(std::shared_ptr<ResultSink> sink);
  // The connection closed: its streaming transfers end with `reason` (no RESULT is sent).
  // Transports pass kMalformedFrame when they closed it because the byte stream lost framing.
  void DetachPeer(PeerId peer, std::string_view why,
                  TransferError reason = TransferError::kPeerDisconnected);
  // Validates a sender's HELLO (version, role, auth). A failure closes the connection.
  absl::Status AcceptHello(PeerId peer, const HelloFrame& hello);
  // Our HELLO reply. `auth` stays empty.
  HelloFrame LocalHello() const;
  // Applies one framed message from `peer`. A body that fails to decode ends the transfer it
  // names (or is ignored when it names none). Returns an error only when the connection itself
  // is unusable (e.g. HELLO twice, a RESULT sent to a receiver); the transport then closes it.
  absl::Status OnFrame(PeerId peer, FrameType type, std::span<const std::byte> body);
  // Same, for an already decoded frame (in-process transport, tests).
  absl::Status OnFrame(PeerId peer, const Frame& frame);

  // ---- Transport side: LAYER payloads read in place ----
  // Usage (one IncomingLayer per connection, reused; frames of a connection still in order):
  //   BeginLayer(peer, fixed, body_bytes, &layer);           // after reading header + fixed part
  //   kDiscard: read and drop layer.payload_bytes().
  //   otherwise, until layer.complete():
  //     if (!AcquireLayerWrite(&layer)) { AbandonLayer(...); drop the rest of the payload; }
  //     n = one socket read into layer.NextBuffers(...);  layer.Received(n);
  //     ReleaseLayerWrite(&layer);
  //   FinishLayer(&layer);                                    // AbandonLayer if the read fails
  //
  // `fixed` is the first kLayerFixedBytes of a LAYER body of `body_bytes` bytes. BeginLayer
  // applies every check OnFrame applies to a LAYER up to (not including) the checksum, with the
  // same outcomes, and claims the frame's token range. Then `layer` is:
  // - kDiscard: the frame was refused (its transfer ended), ignored (late, unknown, another
  //   peer's transfer) or malformed (handled as OnFrame handles a bad body);
  // - kInPlace (only if `in_place_ok` and the store allows it, KvStore::InPlaceRegions): the
  //   payload goes into the transfer's own reserved blocks, before its checksum is verified;
  // - kStaged: into the IncomingLayer's staging memory; FinishLayer verifies it, then writes it
  //   (KvStore::WriteTokens), exactly as OnFrame does.
  //
  // Why kInPlace keeps DESIGN §9 ("decode never commits KV it has not verified"): bytes in a
  // transfer's blocks are committed only when the transfer ends OK (on_done with OK hands the
  // block table to the decode side). Until then the blocks are this transfer's alone: the decode
  // side reserved them for this sequence (ExpectTransfer requires its reference), does not read
  // them before on_done, and does not publish them to the prefix cache. A payload that fails its
  // checksum (or a connection lost mid-payload) ends the whole transfer with an error and END is
  // refused while a frame is unverified, so unverified bytes are never served: the blocks only
  // go back to the pool, whose next user overwrites them. Each write into the blocks is bracketed
  // by AcquireLayerWrite/ReleaseLayerWrite, which hold the landing's reference for the duration
  // of that write only: a transfer that ends mid-payload (cancel, deadline) while its peer stalls
  // gives its blocks back at once, and once it has ended nothing more is written into them. (As
  // with OnFrame writes in flight, the decode side must not reuse blocks it reserved for a
  // transfer before that transfer has ended.)
  void BeginLayer(PeerId peer, std::span<const std::byte> fixed, uint64_t body_bytes,
                  IncomingLayer* layer, bool in_place_ok = true);
  // Brackets one write into the spans layer->NextBuffers() gives. Acquire returns false when the
  // frame's transfer has ended (or the layer is not delivering): write nothing, drop the rest.
  // Cheap (one uncontended lock each); meant for one socket read of up to a few hundred KiB.
  bool AcquireLayerWrite(IncomingLayer* layer);
  void ReleaseLayerWrite(IncomingLayer* layer);
  // Every payload byte was Received(): verifies the checksum and commits the frame, or ends its
  // transfer (kChecksumMismatch; kStoreWriteFailed). Leaves `layer` idle. For kDiscard (or
  // kIdle) it only resets `layer`.
  void FinishLayer(IncomingLayer* layer);
  // The payload will never be complete (connection lost or closed mid-frame, or the transport
  // stops delivering after AcquireLayerWrite failed): ends its transfer with `reason` unless it
  // already ended. Leaves `layer` idle. For kDiscard (or kIdle) it only resets `layer`.
  void AbandonLayer(IncomingLayer* layer, TransferError reason, std::string_view why);

  LandingStats Stats() const;
  const KvStoreLayout& store_layout() const { return store_.layout(); }

 private:
  friend class IncomingLayer;
  struct Transfer;
  // Work left to do once the lock is dropped: callbacks, RESULTs, block releases.
  struct Deferred;

  void OnBegin(PeerId peer, const BeginFrame& f, Deferred& d);
  void OnLayer(PeerId peer, const LayerFrame& f, Deferred& d);
  // The checks of a LAYER before its checksum (shared by OnLayer and BeginLayer). On success
  // claims the range, counts a write in flight and returns the transfer; otherwise ends or
  // ignores as the frame deserves and returns null.
  std::shared_ptr<Transfer> ClaimLayerLocked(PeerId peer, const LayerHeader& h, uint64_t k_bytes,
                                             uint64_t v_bytes, Deferred& d)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A write into the transfer's blocks (writes_in_flight) has returned; releases the blocks if
  // the transfer ended meanwhile and this was the last writer.
  void EndWriteLocked(const std::shared_ptr<Transfer>& t, Deferred& d)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A claimed LAYER is done: commits its bytes, or ends the transfer with `error`.
  void FinishWriteLocked(const std::shared_ptr<Transfer>& t, TransferError error,
                         std::string detail, uint64_t bytes, Deferred& d)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void OnEnd(PeerId peer, const EndFrame& f, Deferred& d);
  void OnAbort(PeerId peer, const AbortFrame& f, Deferred& d);
  void OnBadBody(PeerId peer, FrameType type, std::span<const std::byte> body,
                 const absl::Status& why, Deferred& d);
  // Ends `t` (must be live; held by value, as erasing it from transfers_ may drop the last
  // other reference) with `reason`; removes it from transfers_, records a tombstone, and
  // queues its callback, its RESULT and its block release (the release waits for writes in
  // flight). `end` carries the first token on success.
  void EndLocked(std::shared_ptr<Transfer> t, TransferError reason, std::string detail,
                 bool notify_peer, Deferred& d, const EndFrame* end = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void QueueResultLocked(PeerId peer, uint64_t transfer_id, TransferError reason, std::string text,
                         Deferred& d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Answers a frame for a transfer not in transfers_ (ended or never known).
  void LateFrameLocked(PeerId peer, FrameType type, uint64_t transfer_id, Deferred& d)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Run(Deferred& d);

  BlockPool& pool_;
  KvStore& store_;
  const KvLandingOptions options_;

  mutable absl::Mutex mu_;
  std::unordered_map<uint64_t, std::shared_ptr<Transfer>> transfers_ ABSL_GUARDED_BY(mu_);
  std::unordered_map<PeerId, std::shared_ptr<ResultSink>> peers_ ABSL_GUARDED_BY(mu_);
  PeerId next_peer_ ABSL_GUARDED_BY(mu_) = 1;
  // Ended transfer ids and why, oldest first (bounded by options_.tombstones).
  std::unordered_map<uint64_t, TransferError> tombstones_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> tombstone_ring_ ABSL_GUARDED_BY(mu_);
  size_t tombstone_next_ ABSL_GUARDED_BY(mu_) = 0;
  LandingStats stats_ ABSL_GUARDED_BY(mu_);
};

// One LAYER frame whose K/V payload a transport delivers piecewise (KvLanding::BeginLayer). A
// transport keeps one per connection and reuses it: its region list and staging memory are kept
// between frames, so once warm the per-frame path allocates nothing. Not thread-safe: it belongs
// to the connection that reads the frame.
class IncomingLayer {
 public:
  enum class Mode {
    kIdle,     // no frame in progress
    kDiscard,  // nothing to deliver: read payload_bytes() and drop them
    kInPlace,  // straight into the transfer's reserved blocks; verified at FinishLayer
    kStaged,   // into staging memory; verified, then written into the store, at FinishLayer
  };

  IncomingLayer() = default;
  // A frame still in progress is abandoned (KvLanding::AbandonLayer, kPeerDisconnected).
  ~IncomingLayer();
  IncomingLayer(const IncomingLayer&) = delete;
  IncomingLayer& operator=(const IncomingLayer&) = delete;

  Mode mode() const { return mode_; }
  // K + V bytes of the frame in progress, and how many of them have been Received().
  uint64_t payload_bytes() const { return payload_bytes_; }
  uint64_t received_bytes() const { return received_; }
  bool complete() const { return received_ == payload_bytes_; }

  // Fills `out` with up to out.size() spans (in order) where the next payload bytes go, at most
  // `max_bytes` in all; returns how many spans it filled (0 when complete or kDiscard/kIdle).
  size_t NextBuffers(std::span<std::span<std::byte>> out, size_t max_bytes) const;
  // The next `n` payload bytes (n <= payload_bytes() - received_bytes()) have been written, in
  // order, where NextBuffers said. They are hashed now, while still hot in cache.
  void Received(size_t n);

 private:
  friend class KvLanding;
  void Reset();

  KvLanding* landing_ = nullptr;
  std::shared_ptr<KvLanding::Transfer> transfer_;  // set in kInPlace/kStaged
  Mode mode_ = Mode::kIdle;
  LayerHeader header_;
  int32_t layer_ = 0;
  int64_t first_position_ = 0;  // sequence position of the frame's first token
  uint64_t payload_bytes_ = 0;
  uint64_t received_ = 0;
  // Destination of the payload, in order; cursor (region_, offset_) at byte received_.
  std::vector<std::span<std::byte>> regions_;
  size_t region_ = 0;
  size_t offset_ = 0;
  std::unique_ptr<std::byte[]> staging_;
  size_t staging_bytes_ = 0;
  bool write_held_ = false;  // between AcquireLayerWrite and ReleaseLayerWrite
  LayerChecksumStream checksum_;
};

}  // namespace tandem
