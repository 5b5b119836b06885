// KV landing: validation and application of incoming transfers, and their reclaim paths.
#include "kvcache/kv_landing.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kvcache/internal/strings.h"

namespace tandem {

struct KvLanding::Transfer {
  enum class Phase { kExpected, kStreaming, kEnded };

  ExpectedTransfer spec;
  std::vector<BlockId> retained;  // the landing's own references (blocks this transfer writes)
  Phase phase = Phase::kExpected;
  PeerId peer = 0;
  DType src_dtype = DType::kBF16;
  std::vector<uint64_t> next_token;  // per layer: tokens received so far (in order)
  int64_t layers_complete = 0;
  int writes_in_flight = 0;   // writes into the blocks in progress outside the lock
  int unverified_frames = 0;  // claimed by BeginLayer, not yet verified (FinishLayer)
  bool released = false;      // `retained` handed back to the pool
  uint64_t bytes = 0;
  KvClock::time_point created;
};

struct KvLanding::Deferred {
  struct Result {
    std::shared_ptr<ResultSink> sink;
    uint64_t transfer_id;
    TransferError reason;
    std::string text;
  };
  std::vector<std::pair<LandingCallback, LandingOutcome>> callbacks;
  std::vector<Result> results;
  std::vector<std::vector<BlockId>> releases;
};

namespace {

// tokens x elems x dtype bytes, or nullopt on overflow.
std::optional<uint64_t> TensorBytes(uint64_t tokens, int64_t token_elems, DType dtype) {
  uint64_t per_token = 0;
  uint64_t total = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(token_elems), DTypeSize(dtype), &per_token) ||
      __builtin_mul_overflow(tokens, per_token, &total)) {
    return std::nullopt;
  }
  return total;
}

}  // namespace

KvLanding::KvLanding(BlockPool& pool, KvStore& store, KvLandingOptions options)
    : pool_(pool), store_(store), options_(std::move(options)) {
  absl::MutexLock lock(&mu_);
  tombstone_ring_.assign(std::max<size_t>(options_.tombstones, 1), 0);
}

KvLanding::~KvLanding() {
  Deferred d;
  {
    absl::MutexLock lock(&mu_);
    std::vector<std::shared_ptr<Transfer>> live;
    live.reserve(transfers_.size());
    for (auto& [id, t] : transfers_) live.push_back(t);
    for (auto& t : live) {
      EndLocked(t, TransferError::kShutdown, "receiver shutting down", /*notify_peer=*/false, d);
    }
  }
  Run(d);
}

absl::Status KvLanding::ExpectTransfer(ExpectedTransfer spec) {
  const KvStoreLayout& layout = store_.layout();
  if (spec.transfer_id == 0) {
    return absl::InvalidArgumentError("transfer id 0 is reserved");
  }
  if (!(spec.geometry == layout.geometry)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "transfer geometry ", spec.geometry.num_layers, "x", spec.geometry.num_kv_heads, "x",
        spec.geometry.head_dim, " differs from the store's ", layout.geometry.num_layers, "x",
        layout.geometry.num_kv_heads, "x", layout.geometry.head_dim));
  }
  if (spec.token_count <= 0 || static_cast<uint64_t>(spec.token_count) > kMaxWireTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("token count ", spec.token_count, " outside [1, ", kMaxWireTokens, "]"));
  }
  if (spec.start_position < 0 || static_cast<uint64_t>(spec.start_position) > kMaxWirePosition) {
    return absl::InvalidArgumentError("start position out of range");
  }
  if (absl::Status s =
          ValidateTokenRange(layout, 0, spec.block_table, spec.start_position, spec.token_count);
      !s.ok()) {
    return s;
  }
  const int64_t first_block = spec.start_position / layout.block_size;
  const int64_t last_block = (spec.start_position + spec.token_count - 1) / layout.block_size;
  std::vector<BlockId> retained(spec.block_table.begin() + first_block,
                                spec.block_table.begin() + last_block + 1);
  for (BlockId b : retained) {
    if (pool_.RefCount(b) <= 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("block ", b, " is not reserved (the caller must hold a reference)"));
    }
  }
  auto t = std::make_shared<Transfer>();
  t->created = KvClock::now();
  t->next_token.assign(layout.geometry.num_layers, 0);
  absl::MutexLock lock(&mu_);
  if (transfers_.count(spec.transfer_id) != 0) {
    return absl::AlreadyExistsError(absl::StrCat("transfer ", spec.transfer_id, " already live"));
  }
  // The landing's own reference: the caller's and ours are released independently.
  pool_.Retain(retained);
  t->retained = std::move(retained);
  tombstones_.erase(spec.transfer_id);
  const uint64_t id = spec.transfer_id;
  t->spec = std::move(spec);
  transfers_.emplace(id, std::move(t));
  ++stats_.transfers_expected;
  ++stats_.active_transfers;
  return absl::OkStatus();
}

bool KvLanding::Cancel(uint64_t transfer_id) {
  Deferred d;
  bool found = false;
  {
    absl::MutexLock lock(&mu_);
    auto it = transfers_.find(transfer_id);
    if (it != transfers_.end()) {
      found = true;
      EndLocked(it->second, TransferError::kCancelledByReceiver, "cancelled by the decode side",
                /*notify_peer=*/true, d);
    } else {
      ++stats_.late_frames;
    }
  }
  Run(d);
  return found;
}

int KvLanding::ReapExpired(KvClock::time_point now) {
  Deferred d;
  int n = 0;
  {
    absl::MutexLock lock(&mu_);
    std::vector<std::shared_ptr<Transfer>> expired;
    for (auto& [id, t] : transfers_) {
      if (t->spec.deadline <= now) expired.push_back(t);
    }
    for (auto& t : expired) {
      const char* where = t->phase == Transfer::Phase::kExpected ? "before BEGIN" : "mid-transfer";
      EndLocked(t, TransferError::kDeadlineExceeded,
                absl::StrCat("transfer deadline passed ", where), /*notify_peer=*/true, d);
      ++n;
    }
  }
  Run(d);
  return n;
}

std::optional<KvClock::time_point> KvLanding::NextDeadline() const {
  absl::MutexLock lock(&mu_);
  std::optional<KvClock::time_point> next;
  for (const auto& [id, t] : transfers_) {
    if (!next || t->spec.deadline < *next) next = t->spec.deadline;
  }
  return next;
}

PeerId KvLanding::AttachPeer(std::shared_ptr<ResultSink> sink) {
  absl::MutexLock lock(&mu_);
  const PeerId id = next_peer_++;
  peers_.emplace(id, std::move(sink));
  return id;
}

void KvLanding::DetachPeer(PeerId peer, std::string_view why, TransferError reason) {
  Deferred d;
  {
    absl::MutexLock lock(&mu_);
    peers_.erase(peer);
    std::vector<std::shared_ptr<Transfer>> bound;
    for (auto& [id, t] : transfers_) {
      if (t->peer == peer) bound.push_back(t);
    }
    for (auto& t : bound) {
      EndLocked(t, reason, std::string(why), /*notify_peer=*/false, d);
    }
  }
  Run(d);
}

absl::Status KvLanding::AcceptHello(PeerId, const HelloFrame& hello) {
  if (hello.protocol_version != kWireVersion) {
    return TransferStatus(TransferError::kAuthFailed,
                          absl::StrCat("protocol version ", hello.protocol_version,
                                       " not supported (this receiver speaks ", kWireVersion, ")"));
  }
  if (hello.role != PeerRole::kSender) {
    return TransferStatus(TransferError::kAuthFailed, "peer does not say it is a sender");
  }
  const std::string& secret = options_.hello_secret;
  if (!secret.empty()) {
    bool equal = hello.auth.size() == secret.size();
    uint8_t diff = 0;
    for (size_t i = 0; equal && i < secret.size(); ++i) {
      diff |= static_cast<uint8_t>(hello.auth[i] ^ secret[i]);
    }
    if (!equal || diff != 0) {
      return TransferStatus(TransferError::kAuthFailed, "HELLO auth rejected");
    }
  }
  return absl::OkStatus();
}

HelloFrame KvLanding::LocalHello() const {
  HelloFrame h;
  h.role = PeerRole::kReceiver;
  h.incarnation_id = options_.incarnation_id;
  return h;
}

absl::Status KvLanding::OnFrame(PeerId peer, FrameType type, std::span<const std::byte> body) {
  absl::StatusOr<Frame> frame = DecodeFrameBody(type, body);
  if (!frame.ok()) {
    Deferred d;
    OnBadBody(peer, type, body, frame.status(), d);
    Run(d);
    return absl::OkStatus();
  }
  return OnFrame(peer, *frame);
}

absl::Status KvLanding::OnFrame(PeerId peer, const Frame& frame) {
  Deferred d;
  absl::Status status;
  if (const auto* f = std::get_if<LayerFrame>(&frame)) {
    OnLayer(peer, *f, d);
  } else if (const auto* f = std::get_if<BeginFrame>(&frame)) {
    OnBegin(peer, *f, d);
  } else if (const auto* f = std::get_if<EndFrame>(&frame)) {
    OnEnd(peer, *f, d);
  } else if (const auto* f = std::get_if<AbortFrame>(&frame)) {
    OnAbort(peer, *f, d);
  } else if (std::holds_alternative<HelloFrame>(frame)) {
    status = TransferStatus(TransferError::kProtocolViolation, "HELLO after the handshake");
  } else {
    status = TransferStatus(TransferError::kProtocolViolation, "RESULT sent to a receiver");
  }
  Run(d);
  return status;
}

void KvLanding::OnBadBody(PeerId peer, FrameType type, std::span<const std::byte> body,
                          const absl::Status& why, Deferred& d) {
  absl::MutexLock lock(&mu_);
  ++stats_.frames_received;
  const std::optional<uint64_t> id = PeekTransferId(type, body);
  if (!id) {
    ++stats_.unknown_frames;
    return;
  }
  auto it = transfers_.find(*id);
  if (it == transfers_.end()) {
    LateFrameLocked(peer, type, *id, d);
    return;
  }
  const std::shared_ptr<Transfer> t = it->second;
  // A transfer streaming from another peer is not that peer's to break; an unclaimed one is
  // ended, as a BEGIN with a wrong token would end it.
  if (t->phase == Transfer::Phase::kStreaming && t->peer != peer) {
    ++stats_.foreign_frames;
    return;
  }
  if (t->peer == 0) {
    t->peer = peer;
  }
  EndLocked(t, TransferError::kMalformedFrame, std::string(why.message()), /*notify_peer=*/true, d);
}

void KvLanding::OnBegin(PeerId peer, const BeginFrame& f, Deferred& d) {
  absl::MutexLock lock(&mu_);
  ++stats_.frames_received;
  auto it = transfers_.find(f.transfer_id);
  if (it == transfers_.end()) {
    LateFrameLocked(peer, FrameType::kBegin, f.transfer_id, d);
    return;
  }
  const std::shared_ptr<Transfer> t = it->second;
  if (t->phase != Transfer::Phase::kExpected) {
    if (t->peer == peer) {
      EndLocked(t, TransferError::kProtocolViolation, "BEGIN twice", /*notify_peer=*/true, d);
    } else {
      // The one-time token was already used: refuse the newcomer, leave the transfer alone.
      ++stats_.foreign_frames;
      QueueResultLocked(peer, f.transfer_id, TransferError::kBadToken,
                        "transfer already claimed by another connection", d);
    }
    return;
  }
  // Bind first so that the failure RESULT goes to the peer that sent this BEGIN.
  t->peer = peer;
  const ExpectedTransfer& s = t->spec;
  if (!TokensEqual(f.token, s.token)) {
    EndLocked(t, TransferError::kBadToken, "BEGIN token does not match the issued one", true, d);
    return;
  }
  if (f.model_fingerprint != s.model_fingerprint) {
    EndLocked(t, TransferError::kFingerprintMismatch,
              absl::StrCat("model fingerprint ", absl::Hex(f.model_fingerprint), " != expected ",
                           absl::Hex(s.model_fingerprint)),
              true, d);
    return;
  }
  if (!(f.geometry == s.geometry)) {
    EndLocked(t, TransferError::kLayoutMismatch,
              absl::StrCat("sender layout ", f.geometry.num_layers, "x", f.geometry.num_kv_heads,
                           "x", f.geometry.head_dim, " != expected ", s.geometry.num_layers, "x",
                           s.geometry.num_kv_heads, "x", s.geometry.head_dim),
              true, d);
    return;
  }
  if (f.token_count != static_cast<uint64_t>(s.token_count) ||
      f.start_position != static_cast<uint64_t>(s.start_position)) {
    EndLocked(t, TransferError::kLayoutMismatch,
              absl::StrCat("tokens [", f.start_position, ", +", f.token_count, ") != expected [",
                           s.start_position, ", +", s.token_count, ")"),
              true, d);
    return;
  }
  // Every wire dtype converts into every store dtype (KvStore::WriteTokens); DecodeFrameBody
  // has already refused unknown dtype codes.
  t->src_dtype = f.dtype;
  t->phase = Transfer::Phase::kStreaming;
  t->spec.token = TransferToken{};  // one-time: forget it
}

std::shared_ptr<KvLanding::Transfer> KvLanding::ClaimLayerLocked(PeerId peer, const LayerHeader& f,
                                                                 uint64_t k_bytes, uint64_t v_bytes,
                                                                 Deferred& d) {
  ++stats_.frames_received;
  auto it = transfers_.find(f.transfer_id);
  if (it == transfers_.end()) {
    LateFrameLocked(peer, FrameType::kLayer, f.transfer_id, d);
    return nullptr;
  }
  std::shared_ptr<Transfer> t = it->second;
  if (t->peer != peer) {
    if (t->phase == Transfer::Phase::kStreaming) {
      ++stats_.foreign_frames;  // someone else's transfer: not this peer's to break
      return nullptr;
    }
    t->peer = peer;
  }
  if (t->phase != Transfer::Phase::kStreaming) {
    EndLocked(t, TransferError::kProtocolViolation, "LAYER before BEGIN", true, d);
    return nullptr;
  }
  const KvGeometry& g = t->spec.geometry;
  if (f.layer >= static_cast<uint32_t>(g.num_layers)) {
    EndLocked(t, TransferError::kLayerOutOfRange,
              absl::StrCat("layer ", f.layer, " >= ", g.num_layers), true, d);
    return nullptr;
  }
  const uint64_t total = static_cast<uint64_t>(t->spec.token_count);
  if (f.first_token > total || f.token_count > total - f.first_token) {
    EndLocked(t, TransferError::kTokenRangeOutOfRange,
              absl::StrCat("layer ", f.layer, " tokens [", f.first_token, ", +", f.token_count,
                           ") outside the transfer's ", total, " tokens"),
              true, d);
    return nullptr;
  }
  const uint64_t next = t->next_token[f.layer];
  if (f.first_token < next) {
    EndLocked(t, TransferError::kDuplicateLayer,
              absl::StrCat("layer ", f.layer, " tokens [", f.first_token, ", +", f.token_count,
                           ") already received (next expected token ", next, ")"),
              true, d);
    return nullptr;
  }
  if (f.first_token > next) {
    EndLocked(t, TransferError::kTokenRangeOutOfRange,
              absl::StrCat("layer ", f.layer, " skips tokens [", next, ", ", f.first_token, ")"),
              true, d);
    return nullptr;
  }
  const std::optional<uint64_t> want = TensorBytes(f.token_count, g.token_elems(), t->src_dtype);
  if (!want || k_bytes != *want || v_bytes != *want) {
    EndLocked(t, TransferError::kSizeMismatch,
              absl::StrCat("layer ", f.layer, ": K/V of ", k_bytes, "/", v_bytes,
                           " bytes, expected ", want.value_or(0), " each"),
              true, d);
    return nullptr;
  }
  // Claim the range; the caller verifies and writes without the lock.
  t->next_token[f.layer] = f.first_token + f.token_count;
  if (t->next_token[f.layer] == total) {
    ++t->layers_complete;
  }
  return t;
}

void KvLanding::EndWriteLocked(const std::shared_ptr<Transfer>& t, Deferred& d) {
  --t->writes_in_flight;
  // Ended (cancel, deadline) while we wrote: the release was left to the last writer.
  if (t->phase == Transfer::Phase::kEnded && t->writes_in_flight == 0 && !t->released) {
    t->released = true;
    d.releases.push_back(std::move(t->retained));
  }
}

void KvLanding::FinishWriteLocked(const std::shared_ptr<Transfer>& t, TransferError error,
                                  std::string detail, uint64_t bytes, Deferred& d) {
  if (t->phase == Transfer::Phase::kEnded) {
    return;
  }
  if (error != TransferError::kOk) {
    EndLocked(t, error, std::move(detail), true, d);
    return;
  }
  t->bytes += bytes;
  stats_.bytes_received += bytes;
}

void KvLanding::OnLayer(PeerId peer, const LayerFrame& f, Deferred& d) {
  std::shared_ptr<Transfer> t;
  {
    absl::MutexLock lock(&mu_);
    const LayerHeader h{f.transfer_id, f.layer,    f.token_count,
                        f.first_token, f.k.size(), f.checksum};
    t = ClaimLayerLocked(peer, h, f.k.size(), f.v.size(), d);
    if (!t) {
      return;
    }
    ++t->writes_in_flight;
  }
  const int32_t layer = static_cast<int32_t>(f.layer);
  const int64_t first = t->spec.start_position + static_cast<int64_t>(f.first_token);

  // Verified before anything reaches the store: a whole frame is already in memory, so there
  // is no socket read to overlap with (BeginLayer is the in-place path).
  TransferError error = TransferError::kOk;
  std::string detail;
  if (LayerChecksum(f.k, f.v) != f.checksum) {
    error = TransferError::kChecksumMismatch;
    detail = absl::StrCat("layer ", f.layer, " tokens [", f.first_token, ", +", f.token_count, ")");
  } else if (absl::Status s = store_.WriteTokens(layer, t->spec.block_table, first, f.token_count,
                                                 t->src_dtype, f.k.data(), f.v.data());
             !s.ok()) {
    error = TransferError::kStoreWriteFailed;
    detail = std::string(s.message());
  }

  absl::MutexLock lock(&mu_);
  EndWriteLocked(t, d);
  FinishWriteLocked(t, error, std::move(detail), f.k.size() + f.v.size(), d);
}

void KvLanding::BeginLayer(PeerId peer, std::span<const std::byte> fixed, uint64_t body_bytes,
                           IncomingLayer* layer, bool in_place_ok) {
  if (layer->mode_ == IncomingLayer::Mode::kInPlace ||
      layer->mode_ == IncomingLayer::Mode::kStaged) {
    // The transport skipped FinishLayer: the frame before this one never completed.
    AbandonLayer(layer, TransferError::kProtocolViolation, "LAYER payload left unfinished");
  }
  layer->Reset();
  layer->landing_ = this;
  layer->mode_ = IncomingLayer::Mode::kDiscard;
  layer->payload_bytes_ = body_bytes > kLayerFixedBytes ? body_bytes - kLayerFixedBytes : 0;
  Deferred d;
  absl::StatusOr<LayerHeader> h = DecodeLayerHeader(fixed, body_bytes);
  if (!h.ok()) {
    OnBadBody(peer, FrameType::kLayer, fixed, h.status(), d);
    Run(d);
    return;
  }
  std::shared_ptr<Transfer> t;
  {
    absl::MutexLock lock(&mu_);
    t = ClaimLayerLocked(peer, *h, h->tensor_bytes, h->tensor_bytes, d);
    if (t) {
      ++t->unverified_frames;
    }
  }
  Run(d);
  if (!t) {
    return;
  }
  // The block table does not change while the transfer is live (only a successful END takes
  // it, and END refuses while a frame is unverified).
  layer->transfer_ = std::move(t);
  layer->header_ = *h;
  layer->layer_ = static_cast<int32_t>(h->layer);
  layer->first_position_ =
      layer->transfer_->spec.start_position + static_cast<int64_t>(h->first_token);
  layer->checksum_.Reset();
  if (in_place_ok && store_.InPlaceRegions(layer->layer_, layer->transfer_->spec.block_table,
                                           layer->first_position_, h->token_count,
                                           layer->transfer_->src_dtype, &layer->regions_)) {
    uint64_t mapped = 0;
    for (const auto& r : layer->regions_) mapped += r.size();
    if (mapped == layer->payload_bytes_) {
      layer->mode_ = IncomingLayer::Mode::kInPlace;
      return;
    }
  }
  layer->regions_.clear();
  if (layer->staging_bytes_ < layer->payload_bytes_) {
    // Bounded by the transport's frame limit; grows only (reused for every later frame).
    layer->staging_.reset(new std::byte[layer->payload_bytes_]);
    layer->staging_bytes_ = layer->payload_bytes_;
  }
  layer->regions_.emplace_back(layer->staging_.get(), layer->payload_bytes_);
  layer->mode_ = IncomingLayer::Mode::kStaged;
}

bool KvLanding::AcquireLayerWrite(IncomingLayer* layer) {
  if (layer->mode_ == IncomingLayer::Mode::kStaged) {
    return true;  // staging memory is the IncomingLayer's own
  }
  if (layer->mode_ != IncomingLayer::Mode::kInPlace || layer->write_held_) {
    return false;
  }
  absl::MutexLock lock(&mu_);
  if (layer->transfer_->phase == Transfer::Phase::kEnded) {
    return false;  // its blocks may be gone already
  }
  ++layer->transfer_->writes_in_flight;
  layer->write_held_ = true;
  return true;
}

void KvLanding::ReleaseLayerWrite(IncomingLayer* layer) {
  if (!layer->write_held_) {
    return;
  }
  layer->write_held_ = false;
  Deferred d;
  {
    absl::MutexLock lock(&mu_);
    EndWriteLocked(layer->transfer_, d);
  }
  Run(d);
}

void KvLanding::FinishLayer(IncomingLayer* layer) {
  if (layer->mode_ != IncomingLayer::Mode::kInPlace &&
      layer->mode_ != IncomingLayer::Mode::kStaged) {
    layer->Reset();
    return;
  }
  if (!layer->complete()) {
    AbandonLayer(layer, TransferError::kProtocolViolation, "LAYER payload incomplete");
    return;
  }
  ReleaseLayerWrite(layer);
  const LayerHeader& h = layer->header_;
  const std::shared_ptr<Transfer> t = layer->transfer_;
  TransferError error = TransferError::kOk;
  std::string detail;
  bool write = false;
  if (layer->checksum_.Digest() != h.checksum) {
    // kInPlace: the bytes are in the blocks but never committed: the transfer ends here.
    error = TransferError::kChecksumMismatch;
    detail = absl::StrCat("layer ", h.layer, " tokens [", h.first_token, ", +", h.token_count, ")");
  } else if (layer->mode_ == IncomingLayer::Mode::kStaged) {
    absl::MutexLock lock(&mu_);
    write = t->phase != Transfer::Phase::kEnded;
    if (write) {
      ++t->writes_in_flight;
    }
  }
  if (write) {
    const std::byte* k = layer->staging_.get();
    if (absl::Status s =
            store_.WriteTokens(layer->layer_, t->spec.block_table, layer->first_position_,
                               h.token_count, t->src_dtype, k, k + h.tensor_bytes);
        !s.ok()) {
      error = TransferError::kStoreWriteFailed;
      detail = std::string(s.message());
    }
  }
  const uint64_t bytes = layer->payload_bytes_;
  layer->Reset();
  Deferred d;
  {
    absl::MutexLock lock(&mu_);
    --t->unverified_frames;
    if (write) {
      EndWriteLocked(t, d);
    }
    FinishWriteLocked(t, error, std::move(detail), bytes, d);
  }
  Run(d);
}

void KvLanding::AbandonLayer(IncomingLayer* layer, TransferError reason, std::string_view why) {
  if (layer->mode_ != IncomingLayer::Mode::kInPlace &&
      layer->mode_ != IncomingLayer::Mode::kStaged) {
    layer->Reset();
    return;
  }
  ReleaseLayerWrite(layer);
  const std::shared_ptr<Transfer> t = layer->transfer_;
  const LayerHeader h = layer->header_;
  const uint64_t got = layer->received_;
  const uint64_t want = layer->payload_bytes_;
  layer->Reset();
  Deferred d;
  {
    absl::MutexLock lock(&mu_);
    --t->unverified_frames;
    // Never kOk: the range was claimed but not verified, so the transfer cannot complete.
    FinishWriteLocked(
        t, reason == TransferError::kOk ? TransferError::kPeerDisconnected : reason,
        absl::StrCat(internal::Av(why), " (layer ", h.layer, " tokens [", h.first_token, ", +",
                     h.token_count, "): ", got, " of ", want, " payload bytes)"),
        0, d);
  }
  Run(d);
}

IncomingLayer::~IncomingLayer() {
  if (landing_ != nullptr && (mode_ == Mode::kInPlace || mode_ == Mode::kStaged)) {
    landing_->AbandonLayer(this, TransferError::kPeerDisconnected,
                           "LAYER payload dropped by the receiver");
  }
}

void IncomingLayer::Reset() {
  write_held_ = false;
  transfer_.reset();
  mode_ = Mode::kIdle;
  payload_bytes_ = 0;
  received_ = 0;
  regions_.clear();  // keeps its capacity
  region_ = 0;
  offset_ = 0;
}

size_t IncomingLayer::NextBuffers(std::span<std::span<std::byte>> out, size_t max_bytes) const {
  if (mode_ != Mode::kInPlace && mode_ != Mode::kStaged) {
    return 0;
  }
  size_t n = 0;
  size_t r = region_;
  size_t off = offset_;
  while (n < out.size() && max_bytes > 0 && r < regions_.size()) {
    const size_t len = std::min(regions_[r].size() - off, max_bytes);
    out[n++] = regions_[r].subspan(off, len);
    max_bytes -= len;
    off = 0;
    ++r;
  }
  return n;
}

void IncomingLayer::Received(size_t n) {
  if (n > payload_bytes_ - received_ ||
      (n > 0 && mode_ != Mode::kInPlace && mode_ != Mode::kStaged)) {
    std::fprintf(stderr, "IncomingLayer: %zu bytes received past the payload (%llu of %llu)\n", n,
                 static_cast<unsigned long long>(received_),
                 static_cast<unsigned long long>(payload_bytes_));
    std::abort();
  }
  received_ += n;
  while (n > 0 && region_ < regions_.size()) {
    const std::span<std::byte> piece =
        regions_[region_].subspan(offset_, std::min(n, regions_[region_].size() - offset_));
    checksum_.Update(piece);
    n -= piece.size();
    offset_ += piece.size();
    if (offset_ == regions_[region_].size()) {
      ++region_;
      offset_ = 0;
    }
  }
}

void KvLanding::OnEnd(PeerId peer, const EndFrame& f, Deferred& d) {
  absl::MutexLock lock(&mu_);
  ++stats_.frames_received;
  auto it = transfers_.find(f.transfer_id);
  if (it == transfers_.end()) {
    LateFrameLocked(peer, FrameType::kEnd, f.transfer_id, d);
    return;
  }
  const std::shared_ptr<Transfer> t = it->second;
  if (t->peer != peer) {
    if (t->phase == Transfer::Phase::kStreaming) {
      ++stats_.foreign_frames;
      return;
    }
    t->peer = peer;
  }
  if (t->phase != Transfer::Phase::kStreaming) {
    EndLocked(t, TransferError::kProtocolViolation, "END before BEGIN", true, d);
    return;
  }
  if (t->layers_complete != t->spec.geometry.num_layers || t->writes_in_flight != 0 ||
      t->unverified_frames != 0) {
    EndLocked(t, TransferError::kIncomplete,
              absl::StrCat(t->layers_complete, " of ", t->spec.geometry.num_layers,
                           " layers complete at END"),
              true, d);
    return;
  }
  EndLocked(t, TransferError::kOk, "", true, d, &f);
}

void KvLanding::OnAbort(PeerId peer, const AbortFrame& f, Deferred& d) {
  absl::MutexLock lock(&mu_);
  ++stats_.frames_received;
  auto it = transfers_.find(f.transfer_id);
  if (it == transfers_.end()) {
    LateFrameLocked(peer, FrameType::kAbort, f.transfer_id, d);
    return;
  }
  const std::shared_ptr<Transfer> t = it->second;
  if (t->peer != peer) {
    if (t->phase == Transfer::Phase::kStreaming) {
      ++stats_.foreign_frames;
      QueueResultLocked(peer, f.transfer_id, TransferError::kBadToken,
                        "transfer belongs to another connection", d);
      return;
    }
    t->peer = peer;
  }
  // The RESULT that EndLocked sends is the acknowledgement.
  EndLocked(t, TransferError::kAbortedBySender,
            absl::StrCat("sender aborted (", internal::Av(TransferErrorName(f.reason)),
                         "): ", internal::Av(f.text)),
            true, d);
}

void KvLanding::EndLocked(std::shared_ptr<Transfer> t, TransferError reason, std::string detail,
                          bool notify_peer, Deferred& d, const EndFrame* end) {
  const uint64_t id = t->spec.transfer_id;
  t->phase = Transfer::Phase::kEnded;
  transfers_.erase(id);
  // Tombstone: late frames for this id are answered, not mistaken for unknown transfers.
  if (!tombstone_ring_.empty()) {
    uint64_t& slot = tombstone_ring_[tombstone_next_];
    if (slot != 0) tombstones_.erase(slot);
    slot = id;
    tombstones_[id] = reason;
    tombstone_next_ = (tombstone_next_ + 1) % tombstone_ring_.size();
  }
  if (t->writes_in_flight == 0 && !t->released) {
    t->released = true;
    d.releases.push_back(std::move(t->retained));
  }

  LandingOutcome out;
  out.transfer_id = id;
  out.reason = reason;
  out.status = TransferStatus(reason, absl::StrCat("kv transfer ", id, ": ", detail));
  out.bytes_received = t->bytes;
  out.duration = std::chrono::duration_cast<std::chrono::nanoseconds>(KvClock::now() - t->created);
  --stats_.active_transfers;
  if (reason == TransferError::kOk) {
    ++stats_.transfers_ok;
    stats_.total_ok_transfer_time += out.duration;
    out.block_table = std::move(t->spec.block_table);
    if (end != nullptr) {
      out.first_token = end->first_token;
      out.first_logprob = end->logprob;
    }
  } else {
    ++stats_.transfers_failed;
    ++stats_.failed_by_reason[static_cast<int>(reason)];
  }
  if (notify_peer && t->peer != 0) {
    QueueResultLocked(t->peer, id, reason, std::move(detail), d);
  }
  d.callbacks.emplace_back(std::move(t->spec.on_done), std::move(out));
}

void KvLanding::QueueResultLocked(PeerId peer, uint64_t transfer_id, TransferError reason,
                                  std::string text, Deferred& d) {
  auto it = peers_.find(peer);
  if (it == peers_.end() || !it->second) {
    return;
  }
  d.results.push_back(Deferred::Result{it->second, transfer_id, reason, std::move(text)});
}

void KvLanding::LateFrameLocked(PeerId peer, FrameType type, uint64_t transfer_id, Deferred& d) {
  auto tomb = tombstones_.find(transfer_id);
  TransferError reason = TransferError::kUnknownTransfer;
  std::string text = "no such transfer";
  if (tomb != tombstones_.end()) {
    // A completion (or any frame) after reclaim: counted and ignored, never asserted.
    ++stats_.late_frames;
    reason = tomb->second;
    text = absl::StrCat("transfer already ended (", internal::Av(TransferErrorName(reason)), ")");
  } else {
    ++stats_.unknown_frames;
  }
  // LAYERs are not answered (one RESULT per transfer is enough); BEGIN/END/ABORT are, so the
  // sender's wait ends.
  if (type != FrameType::kLayer) {
    QueueResultLocked(peer, transfer_id, reason, std::move(text), d);
  }
}

void KvLanding::Run(Deferred& d) {
  for (auto& ids : d.releases) {
    pool_.Release(ids);
  }
  for (auto& r : d.results) {
    ResultFrame f;
    f.transfer_id = r.transfer_id;
    f.reason = r.reason;
    f.code = TransferErrorCode(r.reason);
    f.text = r.text;
    r.sink->SendResult(f);
  }
  for (auto& [cb, outcome] : d.callbacks) {
    if (cb) cb(outcome);
    if (options_.observer) options_.observer(outcome);
  }
}

LandingStats KvLanding::Stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

}  // namespace tandem
