// Decode worker: see decode_worker.h.
//
// Threads: gRPC callback threads create calls and report cancellation; the data plane's I/O
// threads end transfers; both only post commands to the step loop, which alone touches the
// engine, the calls' sequence state and the maps below. A call object is owned by its reactor
// until OnDone and by the loop until the loop forgets it (LoopOwnedCall).
#include "decode_worker/decode_worker.h"

#include <grpcpp/grpcpp.h>
#include <prometheus/counter.h>
#include <prometheus/histogram.h>

#include <cstring>
#include <random>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "kvcache/kv_landing.h"
#include "proto/convert.h"
#include "server/common/metrics.h"
#include "server/common/worker_core.h"
#include "tandem/internal/v1/worker.grpc.pb.h"

namespace tandem {
namespace {

using internal::v1::DecodeRequest;
using internal::v1::DecodeResponse;
using Clock = std::chrono::steady_clock;

// "host:port", IPv6 hosts in brackets; a wildcard bind address advertises loopback.
std::string HostPort(std::string host, uint16_t port) {
  if (host.empty() || host == "0.0.0.0") host = "127.0.0.1";
  if (host == "::") host = "::1";
  const bool v6 = host.find(':') != std::string::npos;
  return absl::StrCat(v6 ? "[" : "", host, v6 ? "]" : "", ":", port);
}

}  // namespace

class DecodeCall;

class DecodeWorker::Impl {
 public:
  Impl(DecodeWorkerOptions options, std::unique_ptr<Engine> engine);
  ~Impl() { Shutdown(); }

  absl::Status StartServing();
  void Shutdown();

  WorkerCore& core() { return core_; }
  const WorkerCore& core() const { return core_; }
  uint16_t kv_port() const { return kv_server_ ? kv_server_->port() : 0; }
  std::vector<grpc::Service*> services();

  // gRPC threads.
  grpc::ServerWriteReactor<DecodeResponse>* NewCall(grpc::CallbackServerContext* ctx,
                                                    const DecodeRequest* request);
  void PostCancel(uint64_t call_id);

  // Loop thread.
  void OnEvent(DecodeCall& call, TokenEvent& ev);

 private:
  class Service;

  // Loop thread.
  void StartCall(DecodeCall* call);
  void StartLocal(DecodeCall* call);
  void OnLanded(uint64_t transfer_id, const LandingOutcome& outcome);
  void CancelCall(uint64_t call_id);
  // Gives back whatever the call holds (landing reservation or engine sequence).
  void DropWork(DecodeCall* call);
  // Ends the call with `status` and forgets it.
  void Finalize(DecodeCall* call, const grpc::Status& status);
  TransferToken NewToken();
  // Sequences whose KV is landing hold their blocks already (out of the free count) and count
  // as running.
  void AdjustLoad(EngineLoad* load) {
    load->running += static_cast<int32_t>(landing_calls_.size());
  }

  const DecodeWorkerOptions options_;
  WorkerCore core_;
  Engine& engine_;  // loop thread (see EngineLoop::engine())
  KvLanding landing_;
  std::unique_ptr<KvServer> kv_server_;
  std::unique_ptr<Service> service_;
  std::string kv_address_;
  std::atomic<uint64_t> next_call_id_{1};
  absl::Mutex shutdown_mu_;
  bool shut_down_ ABSL_GUARDED_BY(shutdown_mu_) = false;

  // Loop thread only.
  std::unordered_map<uint64_t, DecodeCall*> calls_;          // by call id
  std::unordered_map<uint64_t, DecodeCall*> landing_calls_;  // by transfer id: KV landing
  uint64_t next_transfer_id_ = 1;
  std::random_device random_;
};

// One Decode call: the reactor (gRPC side: one write in flight, pending tokens coalesced into
// the next message) and the sequence state the loop keeps for it.
class DecodeCall final : public grpc::ServerWriteReactor<DecodeResponse>,
                         public SequenceObserver,
                         public LoopOwnedCall {
 public:
  enum class Phase { kNew, kLanding, kRunning, kEnded };

  DecodeCall(DecodeWorker::Impl& worker, const DecodeRequest* request, uint64_t id)
      : worker_(worker), request_(*request), id_(id) {
    worker_.core().CallCreated();
  }

  uint64_t id() const { return id_; }
  const DecodeRequest& request() const { return request_; }

  // ---- Loop side ----
  void OnTokenEvent(TokenEvent& ev) override { worker_.OnEvent(*this, ev); }

  void SendTicket(internal::v1::LandingTicket ticket) {
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;
      *pending_.mutable_ticket() = std::move(ticket);
      has_pending_ = true;
    }
    Flush();
  }
  void SendLocalPrefill() {
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;
      pending_.set_local_prefill(true);
      has_pending_ = true;
    }
    Flush();
  }
  void SendToken(const TokenEvent& ev, bool with_cached_tokens) {
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;
      TokenEventToProto(ev, pending_.add_tokens());
      if (with_cached_tokens) pending_.set_cached_tokens(ev.cached_tokens);
      has_pending_ = true;
    }
    Flush();
  }
  // The call's outcome: sent once every queued message is written.
  void End(const grpc::Status& status) {
    {
      absl::MutexLock lock(&mu_);
      if (final_status_set_) return;
      final_status_ = status;
      final_status_set_ = true;
    }
    Flush();
  }

  // Loop-thread state.
  Phase phase = Phase::kNew;
  SequenceRequest seq_request;
  std::vector<BlockId> reserved;  // our reference while the KV lands
  uint64_t transfer_id = 0;
  SeqId seq = 0;
  bool local = false;
  bool first_event_sent = false;
  Clock::time_point started;   // set before the loop sees the call
  Clock::time_point deadline;  // the call's deadline (max: none)

  // ---- gRPC side ----
  void OnWriteDone(bool ok) override {
    bool broken = false;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) {
        // The stream is gone (client cancelled or disconnected): nothing more can be written.
        broken = true;
        pending_.Clear();
        has_pending_ = false;
        if (!final_status_set_) {
          final_status_ = grpc::Status(grpc::StatusCode::CANCELLED, "stream closed by the client");
          final_status_set_ = true;
        }
      }
    }
    if (broken) worker_.PostCancel(id_);
    Flush();
  }
  void OnCancel() override { worker_.PostCancel(id_); }
  void OnDone() override {
    worker_.core().CallDone();
    ReleaseFromGrpc();
  }

 private:
  // Starts the next write, or Finish once nothing is left to write and the outcome is known.
  void Flush() {
    bool write = false;
    grpc::Status status;
    {
      absl::MutexLock lock(&mu_);
      if (writing_ || finished_) return;
      if (has_pending_) {
        writing_msg_.Swap(&pending_);
        pending_.Clear();
        has_pending_ = false;
        writing_ = true;
        write = true;
      } else if (final_status_set_) {
        finished_ = true;
        status = final_status_;
      } else {
        return;
      }
    }
    if (write) {
      StartWrite(&writing_msg_);
    } else {
      Finish(status);
    }
  }

  DecodeWorker::Impl& worker_;
  const DecodeRequest request_;
  const uint64_t id_;

  absl::Mutex mu_;
  DecodeResponse pending_ ABSL_GUARDED_BY(mu_);  // coalesced, not yet written
  bool has_pending_ ABSL_GUARDED_BY(mu_) = false;
  DecodeResponse writing_msg_;  // the write in flight (owned by gRPC until OnWriteDone)
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status final_status_ ABSL_GUARDED_BY(mu_);
  bool final_status_set_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;  // Finish called
};

class DecodeWorker::Impl::Service final : public internal::v1::DecodeWorker::CallbackService {
 public:
  explicit Service(Impl& impl) : impl_(impl) {}
  grpc::ServerWriteReactor<DecodeResponse>* Decode(grpc::CallbackServerContext* ctx,
                                                   const DecodeRequest* request) override {
    return impl_.NewCall(ctx, request);
  }

 private:
  Impl& impl_;
};

namespace {

WorkerCoreOptions CoreOptions(const DecodeWorkerOptions& o,
                              std::function<void(EngineLoad*)> adjust_load) {
  WorkerCoreOptions c;
  c.role = internal::v1::ROLE_DECODE;
  c.name = o.name;
  c.model_name = o.model_name;
  c.incarnation_id = o.incarnation_id;
  c.metrics = o.metrics;
  c.adjust_load = std::move(adjust_load);
  return c;
}

KvLandingOptions LandingOptions(uint64_t incarnation_id, const std::string& hello_secret) {
  KvLandingOptions l;
  l.incarnation_id = incarnation_id;
  l.hello_secret = hello_secret;
  return l;
}

}  // namespace

DecodeWorker::Impl::Impl(DecodeWorkerOptions options, std::unique_ptr<Engine> engine)
    : options_(std::move(options)),
      core_(std::move(engine),
            CoreOptions(options_, [this](EngineLoad* load) { AdjustLoad(load); })),
      engine_(core_.engine()),
      landing_(engine_.pool(), engine_.backend().kv_store(),
               LandingOptions(core_.incarnation_id(), options_.hello_secret)),
      service_(std::make_unique<Service>(*this)) {}

absl::Status DecodeWorker::Impl::StartServing() {
  auto server = KvServer::Start(landing_, options_.kv);
  if (!server.ok()) {
    return server.status();
  }
  kv_server_ = *std::move(server);
  kv_address_ = HostPort(
      options_.kv_advertise_host.empty() ? options_.kv.bind_address : options_.kv_advertise_host,
      kv_server_->port());
  core_.SetKvAddress(kv_address_);
  core_.loop().Start();
  return absl::OkStatus();
}

std::vector<grpc::Service*> DecodeWorker::Impl::services() {
  return {service_.get(), core_.info_service()};
}

void DecodeWorker::Impl::Shutdown() {
  {
    absl::MutexLock lock(&shutdown_mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  core_.StartDrain();
  core_.loop().Stop([this] {
    std::vector<DecodeCall*> live;
    live.reserve(calls_.size());
    for (const auto& [id, call] : calls_) live.push_back(call);
    for (DecodeCall* call : live) {
      DropWork(call);
      Finalize(call, grpc::Status(grpc::StatusCode::UNAVAILABLE, "decode worker shutting down"));
    }
  });
  // Transfers still streaming end now; their callbacks find the loop stopped and are dropped
  // (the final command above already gave back every reservation).
  if (kv_server_) kv_server_->Stop();
}

grpc::ServerWriteReactor<DecodeResponse>* DecodeWorker::Impl::NewCall(
    grpc::CallbackServerContext* ctx, const DecodeRequest* request) {
  auto* call = new DecodeCall(*this, request, next_call_id_.fetch_add(1));
  call->started = Clock::now();
  call->deadline = SteadyDeadline(ctx->deadline());
  if (core_.draining()) {
    call->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "draining"));
    call->ReleaseFromLoop();
    return call;
  }
  if (!core_.loop().Post([this, call] { StartCall(call); })) {
    call->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "decode worker shutting down"));
    call->ReleaseFromLoop();
  }
  return call;
}

void DecodeWorker::Impl::PostCancel(uint64_t call_id) {
  // Dropped when the loop has stopped: its final command ended every call.
  core_.loop().Post([this, call_id] { CancelCall(call_id); });
}

TransferToken DecodeWorker::Impl::NewToken() {
  TransferToken token;
  for (size_t i = 0; i < token.size(); i += 4) {
    const uint32_t r = random_();
    std::memcpy(token.data() + i, &r, std::min<size_t>(4, token.size() - i));
  }
  return token;
}

void DecodeWorker::Impl::StartCall(DecodeCall* call) {
  calls_.emplace(call->id(), call);
  call->seq_request = SequenceFromProto(call->request().seq());
  if (absl::Status st = engine_.Validate(call->seq_request); !st.ok()) {
    Finalize(call, ToGrpcStatus(st));
    return;
  }
  if (call->request().local_prefill()) {
    StartLocal(call);
    return;
  }
  const auto& req = call->seq_request;
  const int64_t n = static_cast<int64_t>(req.prompt_ids.size() + req.output_ids.size());
  const int32_t bs = engine_.pool().block_size();
  auto blocks = engine_.pool().Allocate(static_cast<int32_t>((n + bs - 1) / bs));
  if (!blocks.ok()) {
    // No room for the landing right now: prefill here; the engine waits or preempts as usual.
    StartLocal(call);
    return;
  }
  uint64_t transfer_id = next_transfer_id_++;
  if (transfer_id == 0) transfer_id = next_transfer_id_++;
  const KvStoreLayout& layout = engine_.backend().kv_store().layout();
  ExpectedTransfer e;
  e.transfer_id = transfer_id;
  e.token = NewToken();
  e.model_fingerprint = engine_.model().fingerprint;
  e.geometry = layout.geometry;
  e.token_count = n;
  e.start_position = 0;
  e.block_table = *blocks;
  e.deadline = std::min(Clock::now() + options_.transfer_timeout, call->deadline);
  e.on_done = [this, transfer_id](const LandingOutcome& outcome) {
    core_.loop().Post([this, transfer_id, outcome] { OnLanded(transfer_id, outcome); });
  };
  internal::v1::LandingTicket ticket;
  ticket.set_kv_address(kv_address_);
  ticket.set_transfer_id(transfer_id);
  ticket.set_token(reinterpret_cast<const char*>(e.token.data()), e.token.size());
  ticket.set_model_fingerprint(e.model_fingerprint);
  KvLayoutToProto(layout, ticket.mutable_layout());
  ticket.set_token_count(n);
  ticket.set_start_position(0);
  ticket.set_decode_incarnation(core_.incarnation_id());
  if (absl::Status st = landing_.ExpectTransfer(std::move(e)); !st.ok()) {
    engine_.pool().Release(*blocks);
    Finalize(call, grpc::Status(grpc::StatusCode::INTERNAL,
                                absl::StrCat("cannot expect the KV transfer: ", st.message())));
    return;
  }
  call->reserved = *std::move(blocks);
  call->transfer_id = transfer_id;
  call->phase = DecodeCall::Phase::kLanding;
  landing_calls_.emplace(transfer_id, call);
  call->SendTicket(std::move(ticket));
}

void DecodeWorker::Impl::StartLocal(DecodeCall* call) {
  auto seq = engine_.Add(call->seq_request);
  if (!seq.ok()) {
    Finalize(call, ToGrpcStatus(seq.status()));
    return;
  }
  call->seq = *seq;
  call->local = true;
  call->phase = DecodeCall::Phase::kRunning;
  core_.loop().Watch(*seq, call);
  call->SendLocalPrefill();
}

void DecodeWorker::Impl::OnLanded(uint64_t transfer_id, const LandingOutcome& outcome) {
  auto it = landing_calls_.find(transfer_id);
  if (it == landing_calls_.end()) {
    return;  // the call was cancelled (and its blocks given back) before the transfer ended
  }
  DecodeCall* call = it->second;
  landing_calls_.erase(it);
  if (WorkerMetrics* m = options_.metrics) {
    m->kv_transfer_time().Observe(std::chrono::duration<double>(outcome.duration).count());
    m->kv_bytes().Increment(static_cast<double>(outcome.bytes_received));
    (outcome.status.ok() ? m->kv_transfers_ok() : m->kv_transfers_failed()).Increment();
  }
  if (!outcome.status.ok()) {
    engine_.pool().Release(call->reserved);
    call->reserved.clear();
    Finalize(call, grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                absl::StrCat("KV transfer failed: ", outcome.status.message())));
    return;
  }
  // Our reference on the blocks passes to the engine (also on error).
  auto seq = engine_.AddPrefilled(std::move(call->seq_request), std::move(call->reserved),
                                  outcome.first_token, outcome.first_logprob);
  call->reserved.clear();
  if (!seq.ok()) {
    Finalize(call,
             grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          absl::StrCat("landed KV cannot continue: ", seq.status().message())));
    return;
  }
  call->seq = *seq;
  call->phase = DecodeCall::Phase::kRunning;
  core_.loop().Watch(*seq, call);
}

void DecodeWorker::Impl::OnEvent(DecodeCall& call, TokenEvent& ev) {
  if (!ev.status.ok()) {
    engine_.Abort(call.seq);  // no-op when the sequence already left
    Finalize(&call, ToGrpcStatus(ev.status));
    return;
  }
  if (call.local && !call.first_event_sent && options_.metrics != nullptr) {
    options_.metrics->prefill_time().Observe(
        std::chrono::duration<double>(Clock::now() - call.started).count());
  }
  call.SendToken(ev, /*with_cached_tokens=*/call.local && !call.first_event_sent);
  call.first_event_sent = true;
  if (ev.finish != FinishReason::kNone) {
    Finalize(&call, grpc::Status::OK);
  }
}

void DecodeWorker::Impl::CancelCall(uint64_t call_id) {
  auto it = calls_.find(call_id);
  if (it == calls_.end()) {
    return;  // already ended
  }
  DecodeCall* call = it->second;
  DropWork(call);
  Finalize(call, grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
}

void DecodeWorker::Impl::DropWork(DecodeCall* call) {
  switch (call->phase) {
    case DecodeCall::Phase::kLanding:
      landing_calls_.erase(call->transfer_id);
      // The landing keeps its own block references until no write is in flight; ours go now.
      // Its callback (posted from here) finds no call and is ignored.
      landing_.Cancel(call->transfer_id);
      engine_.pool().Release(call->reserved);
      call->reserved.clear();
      break;
    case DecodeCall::Phase::kRunning:
      core_.loop().Unwatch(call->seq);
      engine_.Abort(call->seq);
      break;
    case DecodeCall::Phase::kNew:
    case DecodeCall::Phase::kEnded:
      break;
  }
}

void DecodeWorker::Impl::Finalize(DecodeCall* call, const grpc::Status& status) {
  calls_.erase(call->id());
  call->phase = DecodeCall::Phase::kEnded;
  call->End(status);
  call->ReleaseFromLoop();
}

// ---- DecodeWorker ----

absl::StatusOr<std::unique_ptr<DecodeWorker>> DecodeWorker::Create(DecodeWorkerOptions options) {
  auto engine = Engine::Create(options.engine);
  if (!engine.ok()) {
    return engine.status();
  }
  auto impl = std::make_unique<Impl>(std::move(options), *std::move(engine));
  if (absl::Status st = impl->StartServing(); !st.ok()) {
    return st;
  }
  return std::unique_ptr<DecodeWorker>(new DecodeWorker(std::move(impl)));
}

DecodeWorker::DecodeWorker(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DecodeWorker::~DecodeWorker() { Shutdown(); }

std::vector<grpc::Service*> DecodeWorker::services() { return impl_->services(); }
void DecodeWorker::SetGrpcAddress(const std::string& address) {
  impl_->core().SetGrpcAddress(address);
}
internal::v1::WorkerInfo DecodeWorker::Info() const { return impl_->core().Info(); }
internal::v1::WorkerLoad DecodeWorker::Load() const { return impl_->core().Load(); }
uint16_t DecodeWorker::kv_port() const { return impl_->kv_port(); }
void DecodeWorker::StartDrain() { impl_->core().StartDrain(); }
bool DecodeWorker::draining() const { return impl_->core().draining(); }
int DecodeWorker::in_flight() const { return impl_->core().in_flight(); }
bool DecodeWorker::Healthy(std::chrono::milliseconds stall_threshold) const {
  return impl_->core().Healthy(stall_threshold);
}
void DecodeWorker::Shutdown() { impl_->Shutdown(); }
int32_t DecodeWorker::free_blocks() const { return impl_->core().free_blocks(); }
int32_t DecodeWorker::total_blocks() const { return impl_->core().total_blocks(); }
std::string DecodeWorker::CheckKvInvariants() const { return impl_->core().CheckKvInvariants(); }

}  // namespace tandem
