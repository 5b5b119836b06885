// Prefill worker: see prefill_worker.h.
//
// Threads: gRPC callback threads create calls and report cancellation; the data-plane client's
// I/O threads report transfer acknowledgements; both only post commands to the step loop, which
// alone touches the engine, the calls' state and the exports below. An export (the outgoing
// transfer of one prompt's KV) lives until the receiver acknowledged it, which may be after the
// call was answered: the first token goes back at once (TTFT), not after the receiver's ack.
#include "prefill_worker/prefill_worker.h"

#include <grpcpp/grpcpp.h>
#include <prometheus/counter.h>
#include <prometheus/histogram.h>

#include <cstring>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "proto/convert.h"
#include "server/common/metrics.h"
#include "server/common/worker_core.h"
#include "server/common/worker_info.h"
#include "tandem/internal/v1/worker.grpc.pb.h"

namespace tandem {
namespace {

using internal::v1::PrefillRequest;
using internal::v1::PrefillResponse;
using Clock = std::chrono::steady_clock;

grpc::Status Error(grpc::StatusCode code, std::string message) {
  return grpc::Status(code, std::move(message));
}

}  // namespace

class PrefillCall;

class PrefillWorker::Impl {
 public:
  Impl(PrefillWorkerOptions options, std::unique_ptr<Engine> engine,
       std::unique_ptr<KvClient> client);
  ~Impl() { Shutdown(); }

  void Start() { core_.loop().Start(); }
  void Shutdown();

  WorkerCore& core() { return core_; }
  const WorkerCore& core() const { return core_; }
  std::vector<grpc::Service*> services();

  // gRPC threads.
  grpc::ServerUnaryReactor* NewCall(grpc::CallbackServerContext* ctx, const PrefillRequest* request,
                                    PrefillResponse* response);
  void PostCancel(uint64_t call_id);

  // Loop thread.
  void OnEvent(PrefillCall& call, TokenEvent& ev);

 private:
  class Service;

  // One outgoing transfer, kept until its acknowledgement.
  struct Export {
    std::unique_ptr<OutgoingTransfer> transfer;
    uint64_t call_id = 0;  // 0 once the call was answered
    SeqId seq = 0;
    bool in_engine = false;  // the engine still holds the sequence (and a pointer to transfer)
    Clock::time_point begun;
    uint64_t bytes = 0;  // K+V payload bytes of the whole transfer
  };

  // Loop thread.
  void StartCall(PrefillCall* call);
  // The checks of a request and its landing ticket before anything is started.
  grpc::Status Check(const PrefillRequest& request, const SequenceRequest& seq) const;
  void OnAck(uint64_t export_id, const TransferAck& ack);
  void CancelCall(uint64_t call_id, const grpc::Status& status);
  // Answers the call with `status` and forgets it.
  void Finalize(PrefillCall* call, const grpc::Status& status);

  const PrefillWorkerOptions options_;
  WorkerCore core_;
  Engine& engine_;  // loop thread (see EngineLoop::engine())
  std::unique_ptr<KvClient> client_;
  std::unique_ptr<Service> service_;
  std::atomic<uint64_t> next_call_id_{1};
  absl::Mutex shutdown_mu_;
  bool shut_down_ ABSL_GUARDED_BY(shutdown_mu_) = false;

  // Loop thread only (and the shutdown thread once the loop has stopped).
  std::unordered_map<uint64_t, PrefillCall*> calls_;  // by call id
  std::unordered_map<uint64_t, Export> exports_;      // by export id
  uint64_t next_export_id_ = 1;
};

// One Prefill call: the unary reactor and the state the loop keeps for it.
class PrefillCall final : public grpc::ServerUnaryReactor,
                          public SequenceObserver,
                          public LoopOwnedCall {
 public:
  PrefillCall(PrefillWorker::Impl& worker, const PrefillRequest* request, PrefillResponse* response,
              uint64_t id)
      : worker_(worker), request_(request), response_(response), id_(id) {
    worker_.core().CallCreated();
  }

  uint64_t id() const { return id_; }
  const PrefillRequest& request() const { return *request_; }
  PrefillResponse& response() { return *response_; }

  // Answers once (later calls are ignored). The response must be filled before.
  void Reply(const grpc::Status& status) {
    if (replied_.exchange(true)) return;
    Finish(status);
  }

  // Loop-thread state.
  uint64_t export_id = 0;  // 0: none yet
  Clock::time_point started;
  Clock::time_point deadline;  // the call's deadline (max: none)

  // ---- Loop side ----
  void OnTokenEvent(TokenEvent& ev) override { worker_.OnEvent(*this, ev); }

  // ---- gRPC side ----
  void OnCancel() override { worker_.PostCancel(id_); }
  void OnDone() override {
    worker_.core().CallDone();
    ReleaseFromGrpc();
  }

 private:
  PrefillWorker::Impl& worker_;
  // Owned by gRPC; valid until OnDone, which cannot come before Reply.
  const PrefillRequest* const request_;
  PrefillResponse* const response_;
  const uint64_t id_;
  std::atomic<bool> replied_{false};
};

class PrefillWorker::Impl::Service final : public internal::v1::PrefillWorker::CallbackService {
 public:
  explicit Service(Impl& impl) : impl_(impl) {}
  grpc::ServerUnaryReactor* Prefill(grpc::CallbackServerContext* ctx, const PrefillRequest* request,
                                    PrefillResponse* response) override {
    return impl_.NewCall(ctx, request, response);
  }

 private:
  Impl& impl_;
};

namespace {

WorkerCoreOptions CoreOptions(const PrefillWorkerOptions& o) {
  WorkerCoreOptions c;
  c.role = internal::v1::ROLE_PREFILL;
  c.name = o.name;
  c.model_name = o.model_name;
  c.incarnation_id = o.incarnation_id;
  c.metrics = o.metrics;
  return c;
}

}  // namespace

PrefillWorker::Impl::Impl(PrefillWorkerOptions options, std::unique_ptr<Engine> engine,
                          std::unique_ptr<KvClient> client)
    : options_(std::move(options)),
      core_(std::move(engine), CoreOptions(options_)),
      engine_(core_.engine()),
      client_(std::move(client)),
      service_(std::make_unique<Service>(*this)) {}

std::vector<grpc::Service*> PrefillWorker::Impl::services() {
  return {service_.get(), core_.info_service()};
}

void PrefillWorker::Impl::Shutdown() {
  {
    absl::MutexLock lock(&shutdown_mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  core_.StartDrain();
  core_.loop().Stop([this] {
    std::vector<uint64_t> live;
    live.reserve(calls_.size());
    for (const auto& [id, call] : calls_) live.push_back(id);
    for (uint64_t id : live) {
      CancelCall(id, Error(grpc::StatusCode::UNAVAILABLE, "prefill worker shutting down"));
    }
  });
  // The loop has stopped: transfers still waiting for their ack are dropped here (each sends
  // ABORT unless it already ended), before the client they belong to.
  exports_.clear();
  client_.reset();
}

grpc::ServerUnaryReactor* PrefillWorker::Impl::NewCall(grpc::CallbackServerContext* ctx,
                                                       const PrefillRequest* request,
                                                       PrefillResponse* response) {
  auto* call = new PrefillCall(*this, request, response, next_call_id_.fetch_add(1));
  call->started = Clock::now();
  call->deadline = SteadyDeadline(ctx->deadline());
  if (core_.draining()) {
    call->Reply(Error(grpc::StatusCode::UNAVAILABLE, "draining"));
    call->ReleaseFromLoop();
    return call;
  }
  if (!core_.loop().Post([this, call] { StartCall(call); })) {
    call->Reply(Error(grpc::StatusCode::UNAVAILABLE, "prefill worker shutting down"));
    call->ReleaseFromLoop();
  }
  return call;
}

void PrefillWorker::Impl::PostCancel(uint64_t call_id) {
  core_.loop().Post(
      [this, call_id] { CancelCall(call_id, Error(grpc::StatusCode::CANCELLED, "cancelled")); });
}

grpc::Status PrefillWorker::Impl::Check(const PrefillRequest& request,
                                        const SequenceRequest& seq) const {
  if (absl::Status st = engine_.Validate(seq); !st.ok()) {
    return ToGrpcStatus(st);
  }
  if (!request.has_ticket()) {
    return Error(grpc::StatusCode::INVALID_ARGUMENT, "ticket: missing");
  }
  const internal::v1::LandingTicket& t = request.ticket();
  if (t.model_fingerprint() != engine_.model().fingerprint) {
    return Error(
        grpc::StatusCode::FAILED_PRECONDITION,
        absl::StrCat("model fingerprint mismatch: ticket ", FingerprintHex(t.model_fingerprint()),
                     ", this worker ", FingerprintHex(engine_.model().fingerprint)));
  }
  KvGeometry geometry;
  DType dtype;
  if (absl::Status st = KvGeometryFromProto(t.layout(), &geometry, &dtype); !st.ok()) {
    return Error(grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("ticket.", st.message()));
  }
  const KvGeometry& ours = engine_.backend().kv_store().layout().geometry;
  if (!(geometry == ours)) {
    return Error(
        grpc::StatusCode::FAILED_PRECONDITION,
        absl::StrCat("kv layout mismatch: ticket ", geometry.num_layers, "x", geometry.num_kv_heads,
                     "x", geometry.head_dim, ", this worker ", ours.num_layers, "x",
                     ours.num_kv_heads, "x", ours.head_dim, " (layers x kv heads x head dim)"));
  }
  const int64_t n = static_cast<int64_t>(seq.prompt_ids.size() + seq.output_ids.size());
  if (t.token_count() != n) {
    return Error(
        grpc::StatusCode::INVALID_ARGUMENT,
        absl::StrCat("ticket.token_count: ", t.token_count(), " != prompt + output ids (", n, ")"));
  }
  if (t.start_position() != 0) {
    return Error(grpc::StatusCode::INVALID_ARGUMENT, "ticket.start_position: must be 0");
  }
  if (t.token().size() != kTransferTokenBytes) {
    return Error(
        grpc::StatusCode::INVALID_ARGUMENT,
        absl::StrCat("ticket.token: ", t.token().size(), " bytes, want ", kTransferTokenBytes));
  }
  if (t.kv_address().empty()) {
    return Error(grpc::StatusCode::INVALID_ARGUMENT, "ticket.kv_address: empty");
  }
  if (t.transfer_id() == 0) {
    return Error(grpc::StatusCode::INVALID_ARGUMENT, "ticket.transfer_id: 0 is reserved");
  }
  return grpc::Status::OK;
}

void PrefillWorker::Impl::StartCall(PrefillCall* call) {
  calls_.emplace(call->id(), call);
  const PrefillRequest& request = call->request();
  SequenceRequest seq = SequenceFromProto(request.seq());
  if (grpc::Status st = Check(request, seq); !st.ok()) {
    Finalize(call, st);
    return;
  }
  const internal::v1::LandingTicket& t = request.ticket();
  const KvStoreLayout& layout = engine_.backend().kv_store().layout();
  OutgoingTransferSpec spec;
  spec.peer = t.kv_address();
  spec.transfer_id = t.transfer_id();
  std::memcpy(spec.token.data(), t.token().data(), kTransferTokenBytes);
  spec.model_fingerprint = t.model_fingerprint();
  spec.geometry = layout.geometry;
  spec.dtype = layout.dtype;  // the engine exports in its own KV dtype; the receiver converts
  spec.token_count = t.token_count();
  spec.start_position = 0;
  spec.deadline = call->deadline;
  spec.receiver_incarnation = t.decode_incarnation();
  const uint64_t export_id = next_export_id_++;
  auto transfer = client_->Begin(spec, [this, export_id](const TransferAck& ack) {
    core_.loop().Post([this, export_id, ack] { OnAck(export_id, ack); });
  });
  if (!transfer.ok()) {
    Finalize(call, Error(grpc::StatusCode::UNAVAILABLE,
                         absl::StrCat("KV data plane: ", transfer.status().message())));
    return;
  }
  Export& e = exports_[export_id];
  e.transfer = *std::move(transfer);
  e.begun = Clock::now();
  e.bytes = 2 * static_cast<uint64_t>(spec.token_count) * layout.geometry.num_layers *
            layout.geometry.token_elems() * DTypeSize(layout.dtype);
  call->export_id = export_id;
  seq.prefill_only = true;
  seq.kv_export = e.transfer.get();
  auto id = engine_.Add(std::move(seq));
  if (!id.ok()) {
    e.transfer->Abort(TransferError::kAbortedBySender, "prefill refused the sequence");
    Finalize(call, ToGrpcStatus(id.status()));
    return;
  }
  e.call_id = call->id();
  e.seq = *id;
  e.in_engine = true;
  core_.loop().Watch(*id, call);
}

void PrefillWorker::Impl::OnEvent(PrefillCall& call, TokenEvent& ev) {
  // A prefill-only sequence leaves the engine with its first event, whatever it says.
  core_.loop().Unwatch(ev.seq);
  Export& e = exports_.at(call.export_id);
  e.in_engine = false;
  if (!ev.status.ok()) {
    e.transfer->Abort(TransferError::kAbortedBySender, std::string(ev.status.message()));
    Finalize(&call, Error(grpc::StatusCode::UNAVAILABLE,
                          absl::StrCat("KV export failed: ", ev.status.message())));
    return;
  }
  if (absl::Status st = e.transfer->Finish(ev.token, ev.logprob); !st.ok()) {
    Finalize(&call,
             Error(grpc::StatusCode::UNAVAILABLE, absl::StrCat("KV data plane: ", st.message())));
    return;
  }
  if (WorkerMetrics* m = options_.metrics) {
    m->prefill_time().Observe(std::chrono::duration<double>(Clock::now() - call.started).count());
  }
  // END is queued: answer now (the receiver's ack comes later and only ends the export).
  TokenEventToProto(ev, call.response().mutable_first());
  call.response().set_cached_tokens(ev.cached_tokens);
  Finalize(&call, grpc::Status::OK);
}

void PrefillWorker::Impl::OnAck(uint64_t export_id, const TransferAck& ack) {
  auto it = exports_.find(export_id);
  if (it == exports_.end()) {
    return;
  }
  Export& e = it->second;
  if (WorkerMetrics* m = options_.metrics) {
    m->kv_transfer_time().Observe(std::chrono::duration<double>(Clock::now() - e.begun).count());
    if (ack.status.ok()) {
      m->kv_bytes().Increment(static_cast<double>(e.bytes));
    }
    (ack.status.ok() ? m->kv_transfers_ok() : m->kv_transfers_failed()).Increment();
  }
  if (e.in_engine) {
    // The transfer ended before the prompt was computed (receiver cancelled, connection lost,
    // deadline): stop computing it; the engine must drop its pointer before the transfer goes.
    core_.loop().Unwatch(e.seq);
    engine_.Abort(e.seq);
    e.in_engine = false;
  }
  if (e.call_id != 0) {
    auto c = calls_.find(e.call_id);
    if (c != calls_.end()) {
      Finalize(c->second,
               Error(grpc::StatusCode::UNAVAILABLE,
                     absl::StrCat("KV data plane: ", ack.status.ok() ? "transfer ended early"
                                                                     : ack.status.message())));
    }
  }
  exports_.erase(it);
}

void PrefillWorker::Impl::CancelCall(uint64_t call_id, const grpc::Status& status) {
  auto it = calls_.find(call_id);
  if (it == calls_.end()) {
    return;  // already answered
  }
  PrefillCall* call = it->second;
  if (auto e = exports_.find(call->export_id); e != exports_.end()) {
    if (e->second.in_engine) {
      core_.loop().Unwatch(e->second.seq);
      engine_.Abort(e->second.seq);
      e->second.in_engine = false;
    }
    // ABORT with an acknowledgement: the export stays until the receiver answers.
    e->second.transfer->Abort(TransferError::kAbortedBySender,
                              absl::StrCat("prefill call ended: ", status.error_message()));
  }
  Finalize(call, status);
}

void PrefillWorker::Impl::Finalize(PrefillCall* call, const grpc::Status& status) {
  calls_.erase(call->id());
  if (auto e = exports_.find(call->export_id); e != exports_.end()) {
    e->second.call_id = 0;
  }
  call->Reply(status);
  call->ReleaseFromLoop();
}

// ---- PrefillWorker ----

absl::StatusOr<std::unique_ptr<PrefillWorker>> PrefillWorker::Create(PrefillWorkerOptions options) {
  auto engine = Engine::Create(options.engine);
  if (!engine.ok()) {
    return engine.status();
  }
  if (options.incarnation_id == 0) {
    options.incarnation_id = NewIncarnationId();
  }
  KvClientOptions kv = options.kv;
  kv.incarnation_id = options.incarnation_id;  // our HELLO: a restarted sender is a new one
  auto client = KvClient::Create(kv);
  if (!client.ok()) {
    return client.status();
  }
  auto impl = std::make_unique<Impl>(std::move(options), *std::move(engine), *std::move(client));
  impl->Start();
  return std::unique_ptr<PrefillWorker>(new PrefillWorker(std::move(impl)));
}

PrefillWorker::PrefillWorker(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
PrefillWorker::~PrefillWorker() { Shutdown(); }

std::vector<grpc::Service*> PrefillWorker::services() { return impl_->services(); }
void PrefillWorker::SetGrpcAddress(const std::string& address) {
  impl_->core().SetGrpcAddress(address);
}
internal::v1::WorkerInfo PrefillWorker::Info() const { return impl_->core().Info(); }
internal::v1::WorkerLoad PrefillWorker::Load() const { return impl_->core().Load(); }
void PrefillWorker::StartDrain() { impl_->core().StartDrain(); }
bool PrefillWorker::draining() const { return impl_->core().draining(); }
int PrefillWorker::in_flight() const { return impl_->core().in_flight(); }
bool PrefillWorker::Healthy(std::chrono::milliseconds stall_threshold) const {
  return impl_->core().Healthy(stall_threshold);
}
void PrefillWorker::Shutdown() { impl_->Shutdown(); }
int32_t PrefillWorker::free_blocks() const { return impl_->core().free_blocks(); }
int32_t PrefillWorker::total_blocks() const { return impl_->core().total_blocks(); }
std::string PrefillWorker::CheckKvInvariants() const { return impl_->core().CheckKvInvariants(); }

}  // namespace tandem
