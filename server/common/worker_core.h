// What both worker roles share around their step loop: identity (WorkerInfo), drain state, the
// count of calls in flight, the load snapshot, health, and the Worker.GetInfo service; plus the
// ownership rule of their gRPC call objects. No gRPC headers here.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "engine/engine.h"
#include "server/common/engine_loop.h"
#include "tandem/internal/v1/worker.pb.h"

namespace grpc {
class Service;
}

namespace tandem {

struct WorkerCoreOptions {
  internal::v1::Role role = internal::v1::ROLE_UNSPECIFIED;
  std::string name;  // empty: the gRPC address
  std::string model_name;
  uint64_t incarnation_id = 0;  // 0: a random one
  WorkerMetrics* metrics = nullptr;
  // Loop thread: adds what the engine does not know to the load snapshot (see EngineLoop).
  std::function<void(EngineLoad*)> adjust_load;
};

class WorkerCore {
 public:
  WorkerCore(std::unique_ptr<Engine> engine, WorkerCoreOptions options);
  ~WorkerCore();
  WorkerCore(const WorkerCore&) = delete;
  WorkerCore& operator=(const WorkerCore&) = delete;

  EngineLoop& loop() { return loop_; }
  // See EngineLoop::engine() for what may be used off the loop thread.
  Engine& engine() { return loop_.engine(); }
  uint64_t incarnation_id() const { return info_.incarnation_id(); }

  void SetGrpcAddress(const std::string& address);
  void SetKvAddress(const std::string& address);  // decode: the data plane, before serving
  internal::v1::WorkerInfo Info() const;
  internal::v1::WorkerLoad Load() const;

  void StartDrain() { draining_.store(true); }
  bool draining() const { return draining_.load(); }
  // Calls created and not yet done (OnDone), counted by the roles' reactors.
  int in_flight() const { return in_flight_.load(); }
  void CallCreated() { in_flight_.fetch_add(1); }
  void CallDone() { in_flight_.fetch_sub(1); }
  bool Healthy(std::chrono::milliseconds stall_threshold) const;

  // Worker.GetInfo; owned by this.
  grpc::Service* info_service();

  int32_t free_blocks() const;
  int32_t total_blocks() const;
  // BlockPool::CheckInvariants of the engine's pool ("" when consistent).
  std::string CheckKvInvariants() const;

 private:
  EngineLoop loop_;
  BlockPool& pool_;
  internal::v1::WorkerInfo info_;  // fixed at construction; addresses below
  const std::string name_;
  mutable absl::Mutex mu_;
  std::string grpc_address_ ABSL_GUARDED_BY(mu_);
  std::string kv_address_ ABSL_GUARDED_BY(mu_);
  std::atomic<bool> draining_{false};
  std::atomic<int> in_flight_{0};
  std::unique_ptr<grpc::Service> info_service_;
};

// A gRPC call object owned by two parties: its reactor, until gRPC's OnDone, and the step loop,
// until the loop has forgotten the call. The last one to let go deletes it, so per-call state is
// freed only after OnDone and never while a loop command may still reach it.
class LoopOwnedCall {
 public:
  virtual ~LoopOwnedCall() = default;
  void ReleaseFromGrpc() { Unref(); }  // in OnDone
  void ReleaseFromLoop() { Unref(); }  // once no loop structure refers to the call

 private:
  void Unref() {
    if (owners_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      delete this;
    }
  }
  std::atomic<int> owners_{2};
};

// A gRPC deadline (system clock; max = none) on the steady clock the data plane uses.
std::chrono::steady_clock::time_point SteadyDeadline(
    std::chrono::system_clock::time_point deadline);

}  // namespace tandem
