// In-process KV transport.
#include "kvcache/kv_in_process.h"

#include <unordered_map>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace tandem {

// Routes the landing's RESULTs to the transfer they name.
class InProcessKvSender::Channel final : public ResultSink {
 public:
  void Register(uint64_t id, TransferAckCallback cb) {
    absl::MutexLock lock(&mu_);
    pending_[id] = std::move(cb);
  }
  bool Done(uint64_t id) const {
    absl::MutexLock lock(&mu_);
    return pending_.count(id) == 0;
  }
  absl::Status ResultOf(uint64_t id) const {
    absl::MutexLock lock(&mu_);
    auto it = results_.find(id);
    return it == results_.end() ? absl::OkStatus() : it->second;
  }
  void Forget(uint64_t id) {
    absl::MutexLock lock(&mu_);
    results_.erase(id);
  }

  void SendResult(const ResultFrame& f) override {
    Complete(f.transfer_id, f.reason,
             f.reason == TransferError::kOk ? absl::OkStatus()
                                            : absl::Status(f.code, std::string(f.text)));
  }

  // Fires the transfer's callback once; later completions for the id are ignored.
  void Complete(uint64_t id, TransferError reason, absl::Status status) {
    TransferAckCallback cb;
    {
      absl::MutexLock lock(&mu_);
      auto it = pending_.find(id);
      if (it == pending_.end()) {
        return;
      }
      cb = std::move(it->second);
      pending_.erase(it);
      results_[id] = status;
    }
    if (cb) cb(TransferAck{id, std::move(status), reason});
  }

  void FailAll(TransferError reason, std::string_view why) {
    std::unordered_map<uint64_t, TransferAckCallback> pending;
    {
      absl::MutexLock lock(&mu_);
      pending.swap(pending_);
    }
    for (auto& [id, cb] : pending) {
      if (cb) cb(TransferAck{id, TransferStatus(reason, why), reason});
    }
  }

 private:
  mutable absl::Mutex mu_;
  std::unordered_map<uint64_t, TransferAckCallback> pending_ ABSL_GUARDED_BY(mu_);
  // Final status of ended transfers whose OutgoingTransfer is still alive.
  std::unordered_map<uint64_t, absl::Status> results_ ABSL_GUARDED_BY(mu_);
};

namespace {

class InProcessTransfer final : public OutgoingTransfer {
 public:
  InProcessTransfer(KvLanding& landing, std::shared_ptr<InProcessKvSender::Channel> channel,
                    PeerId peer, const OutgoingTransferSpec& spec, uint64_t max_payload)
      : landing_(landing),
        channel_(std::move(channel)),
        peer_(peer),
        id_(spec.transfer_id),
        token_count_(spec.token_count),
        deadline_(spec.deadline),
        max_payload_(max_payload),
        sequencer_(spec) {}

  ~InProcessTransfer() override {
    if (!closed_) {
      Abort(TransferError::kAbortedBySender, "transfer abandoned by the sender");
    }
    channel_->Forget(id_);
  }

  absl::Status SendLayer(LayerSlice slice) override {
    if (absl::Status s = Ended(); !s.ok()) {
      return s;
    }
    if (std::chrono::steady_clock::now() > deadline_) {
      Abort(TransferError::kDeadlineExceeded, "sender deadline passed");
      return TransferStatus(TransferError::kDeadlineExceeded, "sender deadline passed");
    }
    if (absl::Status s = sequencer_.Accept(slice); !s.ok()) {
      return s;
    }
    internal::ForEachLayerFrame(id_, slice, sequencer_.token_bytes(), max_payload_,
                                [&](const LayerFrame& f) {
                                  if (channel_->Done(id_)) return false;
                                  (void)landing_.OnFrame(peer_, Frame(f));
                                  return true;
                                });
    return Ended();
  }

  absl::Status Finish(int32_t first_token, float logprob) override {
    if (absl::Status s = Ended(); !s.ok()) {
      return s;
    }
    if (absl::Status s = sequencer_.CheckComplete(); !s.ok()) {
      return s;
    }
    closed_ = true;
    EndFrame end;
    end.transfer_id = id_;
    end.first_token = first_token;
    end.logprob = logprob;
    (void)landing_.OnFrame(peer_, Frame(end));
    return absl::OkStatus();
  }

  void Abort(TransferError reason, std::string_view text) override {
    closed_ = true;
    if (channel_->Done(id_)) {
      return;
    }
    AbortFrame f;
    f.transfer_id = id_;
    f.reason = reason;
    f.text = text;
    (void)landing_.OnFrame(peer_, Frame(f));
  }

  uint64_t transfer_id() const override { return id_; }
  int64_t token_count() const override { return token_count_; }

 private:
  // The transfer's failure once the receiver ended it, OK while it is live.
  absl::Status Ended() const {
    if (!channel_->Done(id_)) {
      return absl::OkStatus();
    }
    absl::Status s = channel_->ResultOf(id_);
    return s.ok() ? absl::FailedPreconditionError("transfer already completed") : s;
  }

  KvLanding& landing_;
  std::shared_ptr<InProcessKvSender::Channel> channel_;
  const PeerId peer_;
  const uint64_t id_;
  const int64_t token_count_;
  const std::chrono::steady_clock::time_point deadline_;
  const uint64_t max_payload_;
  internal::SendSequencer sequencer_;
  bool closed_ = false;
};

}  // namespace

InProcessKvSender::InProcessKvSender(KvLanding& landing, InProcessKvSenderOptions options)
    : landing_(landing), options_(std::move(options)), channel_(std::make_shared<Channel>()) {
  peer_ = landing_.AttachPeer(channel_);
  HelloFrame hello;
  hello.role = PeerRole::kSender;
  hello.incarnation_id = options_.incarnation_id;
  hello.auth = options_.auth;
  hello_status_ = landing_.AcceptHello(peer_, hello);
}

InProcessKvSender::~InProcessKvSender() {
  landing_.DetachPeer(peer_, "in-process sender destroyed");
  channel_->FailAll(TransferError::kPeerDisconnected, "in-process sender destroyed");
}

absl::StatusOr<std::unique_ptr<OutgoingTransfer>> InProcessKvSender::Begin(
    const OutgoingTransferSpec& spec, TransferAckCallback on_done) {
  if (!hello_status_.ok()) {
    return hello_status_;
  }
  if (absl::Status s = internal::SendSequencer::ValidateSpec(spec); !s.ok()) {
    return s;
  }
  const uint64_t receiver = landing_.LocalHello().incarnation_id;
  if (spec.receiver_incarnation != 0 && spec.receiver_incarnation != receiver) {
    return TransferStatus(TransferError::kIncarnationMismatch,
                          absl::StrCat("receiver incarnation ", receiver, " != ticket's ",
                                       spec.receiver_incarnation));
  }
  if (!channel_->Done(spec.transfer_id)) {
    return absl::AlreadyExistsError(absl::StrCat("transfer ", spec.transfer_id, " in progress"));
  }
  channel_->Register(spec.transfer_id, std::move(on_done));
  auto t = std::make_unique<InProcessTransfer>(landing_, channel_, peer_, spec,
                                               options_.max_frame_payload_bytes);
  BeginFrame b;
  b.transfer_id = spec.transfer_id;
  b.token = spec.token;
  b.model_fingerprint = spec.model_fingerprint;
  b.geometry = spec.geometry;
  b.dtype = spec.dtype;
  b.token_count = static_cast<uint64_t>(spec.token_count);
  b.start_position = static_cast<uint64_t>(spec.start_position);
  (void)landing_.OnFrame(peer_, Frame(b));
  return t;
}

}  // namespace tandem
