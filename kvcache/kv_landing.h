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

  LandingStats Stats() const;
  const KvStoreLayout& store_layout() const { return store_.layout(); }

 private:
  struct Transfer;
  // Work left to do once the lock is dropped: callbacks, RESULTs, block releases.
  struct Deferred;

  void OnBegin(PeerId peer, const BeginFrame& f, Deferred& d);
  void OnLayer(PeerId peer, const LayerFrame& f, Deferred& d);
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

}  // namespace tandem
