// Router: the services and their wiring; see router.h. The Generate flow lives in
// internal/generate_call.cc, the worker registry and choice in internal/worker_pool.cc.
#include "router/router.h"

#include <prometheus/counter.h>
#include <prometheus/gauge.h>

#include "server/common/metrics.h"

#include <grpcpp/grpcpp.h>

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "engine/model.h"
#include "proto/convert.h"
#include "router/internal/generate_call.h"
#include "router/internal/router_core.h"
#include "tandem/internal/v1/worker.grpc.pb.h"
#include "tandem/v1/tandem.grpc.pb.h"

namespace tandem {
namespace {

class TandemService final : public v1::Tandem::CallbackService {
 public:
  explicit TandemService(RouterCore* core) : core_(core) {}

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override {
    return GenerateCall::Start(core_, context, request);
  }

  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(ToGrpcStatus(DoTokenize(*request, response)));
    return reactor;
  }

  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* context,
                                       const v1::ListModelsRequest* /*request*/,
                                       v1::ListModelsResponse* response) override {
    const ServedModel& m = core_->model;
    v1::ModelCard* card = response->add_models();
    card->set_id(m.name);
    card->set_max_model_len(m.max_model_len());
    card->set_vocab_size(m.vocab_size());
    card->set_architecture(m.config.architecture);
    card->set_fingerprint(FingerprintHex(m.fingerprint));
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  absl::Status DoTokenize(const v1::TokenizeRequest& request, v1::TokenizeResponse* response) {
    const ServedModel& m = core_->model;
    if (absl::Status s = CheckModelName(request.model(), m); !s.ok()) {
      return s;
    }
    if (const std::string err = Utf8Error(request.text()); !err.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("text: ", err));
    }
    if (m.tokenizer == nullptr) {
      return absl::InvalidArgumentError("text: model has no tokenizer");
    }
    auto ids = m.tokenizer->Encode(request.text(), request.add_special_tokens());
    if (!ids.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("text: ", ids.status().message()));
    }
    response->mutable_ids()->Assign(ids->begin(), ids->end());
    response->set_count(static_cast<int32_t>(ids->size()));
    response->set_max_model_len(static_cast<int32_t>(m.max_model_len()));
    return absl::OkStatus();
  }

  RouterCore* const core_;
};

class RegistryService final : public internal::v1::Registry::CallbackService {
 public:
  explicit RegistryService(RouterCore* core) : core_(core) {}

  grpc::ServerUnaryReactor* Register(grpc::CallbackServerContext* context,
                                     const internal::v1::RegisterRequest* request,
                                     internal::v1::RegisterResponse* response) override {
    const absl::Status s = core_->pool.Register(request->info());
    if (s.ok()) {
      response->set_heartbeat_interval_ms(
          static_cast<int32_t>(core_->options.heartbeat_interval.count()));
    }
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(ToGrpcStatus(s));
    return reactor;
  }

  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* context,
                                      const internal::v1::HeartbeatRequest* request,
                                      internal::v1::HeartbeatResponse* response) override {
    response->set_known(core_->pool.Heartbeat(*request));
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  RouterCore* const core_;
};

absl::Status CheckOptions(const RouterOptions& o) {
  if (o.heartbeat_interval.count() <= 0) {
    return absl::InvalidArgumentError("heartbeat_interval: must be > 0");
  }
  if (o.missed_heartbeats < 1) {
    return absl::InvalidArgumentError("missed_heartbeats: must be >= 1");
  }
  if (o.max_running < 1) {
    return absl::InvalidArgumentError("max_running: must be >= 1");
  }
  if (o.max_queued < 0) {
    return absl::InvalidArgumentError("max_queued: must be >= 0");
  }
  if (o.max_attempts < 1) {
    return absl::InvalidArgumentError("max_attempts: must be >= 1");
  }
  if (o.request_timeout.count() < 0) {
    return absl::InvalidArgumentError("request_timeout: must be >= 0");
  }
  for (const StaticWorker& w : o.static_workers) {
    if (w.address.empty()) {
      return absl::InvalidArgumentError("static_workers: empty address");
    }
    if (w.role != internal::v1::ROLE_PREFILL && w.role != internal::v1::ROLE_DECODE) {
      return absl::InvalidArgumentError(
          absl::StrCat("static_workers: ", w.address, " needs the prefill or decode role"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ServedModel> LoadServedModel(const RouterOptions& o) {
  // Weights are mmapped, never read: the router needs the config and the fingerprint only.
  auto weights = LoadModelWeights(o.model_dir);
  if (!weights.ok()) {
    return weights.status();
  }
  ServedModel m;
  m.config = (*weights)->config;
  m.fingerprint = (*weights)->fingerprint;
  m.name = o.model_name;
  if (m.name.empty()) {
    m.name = std::filesystem::path(o.model_dir).lexically_normal().filename().string();
    if (m.name.empty()) {  // "dir/" normalises to a trailing empty component
      m.name = std::filesystem::path(o.model_dir).lexically_normal().parent_path().filename();
    }
  }
  if (m.config.max_position_embeddings <= 0 || m.config.vocab_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(o.model_dir, ": config has no context length or vocabulary size"));
  }
  std::error_code ec;
  if (std::filesystem::exists(std::filesystem::path(o.model_dir) / "tokenizer.json", ec)) {
    auto tok = Tokenizer::FromDir(o.model_dir);
    if (!tok.ok()) {
      return tok.status();
    }
    m.tokenizer = *std::move(tok);
  }
  return m;
}

}  // namespace

class Router::Impl {
 public:
  Impl(RouterOptions options, ServedModel model, WorkerPoolOptions pool_options)
      : core_(std::move(options), std::move(model), std::move(pool_options)),
        tandem_(&core_),
        registry_(&core_) {
    if (RouterMetrics* m = core_.options.metrics) {
      core_.admission.SetObserver([m](int running, int queued) {
        m->running().Set(running);
        m->waiting().Set(queued);
      });
    }
  }

  ~Impl() {
    Shutdown();
    // Every call object refers to core_: wait until the last one is gone (their worker calls
    // were cancelled; the gRPC server must already have stopped or finished their server side).
    absl::MutexLock lock(&core_.mu);
    auto none = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(core_.mu) { return core_.calls.empty(); };
    core_.mu.Await(absl::Condition(&none));
  }

  void Shutdown() {
    core_.draining.store(true);
    if (core_.shutting_down.exchange(true)) {
      return;
    }
    std::vector<GenerateCall*> calls;
    {
      absl::MutexLock lock(&core_.mu);
      for (GenerateCall* c : core_.calls) {
        if (c->TryRef()) {
          calls.push_back(c);
        }
      }
    }
    for (GenerateCall* c : calls) {
      c->Abort("router shutting down");
      c->Unref();
    }
    core_.pool.Stop();
  }

  RouterCore core_;
  TandemService tandem_;
  RegistryService registry_;
};

absl::StatusOr<std::unique_ptr<Router>> Router::Create(RouterOptions options) {
  if (absl::Status s = CheckOptions(options); !s.ok()) {
    return s;
  }
  auto model = LoadServedModel(options);
  if (!model.ok()) {
    return model.status();
  }
  WorkerPoolOptions po;
  po.fingerprint = model->fingerprint;
  po.static_workers = options.static_workers;
  po.heartbeat_interval = options.heartbeat_interval;
  po.missed_heartbeats = options.missed_heartbeats;
  auto impl = std::make_unique<Impl>(std::move(options), *std::move(model), std::move(po));
  impl->core_.pool.Start();
  return std::unique_ptr<Router>(new Router(std::move(impl)));
}

Router::Router(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Router::~Router() = default;

std::vector<grpc::Service*> Router::services() { return {&impl_->tandem_, &impl_->registry_}; }

std::vector<WorkerView> Router::Workers() const { return impl_->core_.pool.Views(); }

bool Router::AwaitWorkers(const std::function<bool(const std::vector<WorkerView>&)>& pred,
                          std::chrono::milliseconds timeout) const {
  return impl_->core_.pool.AwaitViews(pred, timeout);
}

void Router::StartDrain() { impl_->core_.draining.store(true); }

bool Router::draining() const { return impl_->core_.draining.load(); }

int Router::in_flight() const {
  absl::MutexLock lock(&impl_->core_.mu);
  return impl_->core_.in_flight;
}

bool Router::AwaitInFlight(const std::function<bool(int)>& pred,
                           std::chrono::milliseconds timeout) const {
  RouterCore& core = impl_->core_;
  absl::MutexLock lock(&core.mu);
  auto holds = [&core, &pred]()
                   ABSL_EXCLUSIVE_LOCKS_REQUIRED(core.mu) { return pred(core.in_flight); };
  return core.mu.AwaitWithTimeout(absl::Condition(&holds), absl::FromChrono(timeout));
}

void Router::Shutdown() { impl_->Shutdown(); }

}  // namespace tandem
