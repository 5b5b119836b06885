// State both worker roles share: see worker_core.h.
#include "server/common/worker_core.h"

#include <grpcpp/grpcpp.h>

#include "proto/convert.h"
#include "server/common/worker_info.h"
#include "tandem/internal/v1/worker.grpc.pb.h"

namespace tandem {
namespace {

class WorkerInfoService final : public internal::v1::Worker::CallbackService {
 public:
  explicit WorkerInfoService(const WorkerCore& core) : core_(core) {}

  grpc::ServerUnaryReactor* GetInfo(grpc::CallbackServerContext* ctx,
                                    const internal::v1::GetInfoRequest* /*request*/,
                                    internal::v1::GetInfoResponse* response) override {
    *response->mutable_info() = core_.Info();
    *response->mutable_load() = core_.Load();
    response->set_draining(core_.draining());
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  const WorkerCore& core_;
};

EngineLoopOptions LoopOptions(const WorkerCoreOptions& o) {
  EngineLoopOptions l;
  l.role = o.role == internal::v1::ROLE_DECODE ? "decode" : "prefill";
  l.adjust_load = o.adjust_load;
  l.metrics = o.metrics;
  return l;
}

}  // namespace

WorkerCore::WorkerCore(std::unique_ptr<Engine> engine, WorkerCoreOptions options)
    : loop_(std::move(engine), LoopOptions(options)),
      pool_(loop_.engine().pool()),
      name_(options.name) {
  Engine& e = loop_.engine();
  info_.set_incarnation_id(options.incarnation_id != 0 ? options.incarnation_id
                                                       : NewIncarnationId());
  info_.set_role(options.role);
  info_.set_backend(e.options().backend);
  info_.set_accelerator_vendor(AcceleratorVendor(e.options().backend));
  info_.set_model_fingerprint(e.model().fingerprint);
  info_.set_model_name(options.model_name);
  KvLayoutToProto(e.backend().kv_store().layout(), info_.mutable_kv_layout());
  info_service_ = std::make_unique<WorkerInfoService>(*this);
}

WorkerCore::~WorkerCore() = default;

void WorkerCore::SetGrpcAddress(const std::string& address) {
  absl::MutexLock lock(&mu_);
  grpc_address_ = address;
}

void WorkerCore::SetKvAddress(const std::string& address) {
  absl::MutexLock lock(&mu_);
  kv_address_ = address;
}

internal::v1::WorkerInfo WorkerCore::Info() const {
  internal::v1::WorkerInfo info = info_;
  absl::MutexLock lock(&mu_);
  info.set_name(name_.empty() ? grpc_address_ : name_);
  info.set_grpc_address(grpc_address_);
  info.set_kv_address(kv_address_);
  return info;
}

internal::v1::WorkerLoad WorkerCore::Load() const {
  internal::v1::WorkerLoad load;
  EngineLoadToProto(loop_.Load(), &load);
  return load;
}

bool WorkerCore::Healthy(std::chrono::milliseconds stall_threshold) const {
  return loop_.Healthy(stall_threshold);
}

grpc::Service* WorkerCore::info_service() { return info_service_.get(); }

int32_t WorkerCore::free_blocks() const { return pool_.num_free_blocks(); }
int32_t WorkerCore::total_blocks() const { return pool_.num_blocks(); }
std::string WorkerCore::CheckKvInvariants() const { return pool_.CheckInvariants(); }

std::chrono::steady_clock::time_point SteadyDeadline(
    std::chrono::system_clock::time_point deadline) {
  using std::chrono::steady_clock;
  const auto left = deadline - std::chrono::system_clock::now();
  // Far-future deadlines (gRPC's "none" is time_point::max()) would overflow the conversion.
  if (left > std::chrono::hours(24 * 365)) {
    return steady_clock::time_point::max();
  }
  return steady_clock::now() + std::chrono::duration_cast<steady_clock::duration>(left);
}

}  // namespace tandem
