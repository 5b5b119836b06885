// Decode worker: serves DecodeWorker.Decode and Worker.GetInfo. Owns an engine driven by one
// step-loop thread (continuous batching: sequences join and leave every step), a KV landing and
// the data-plane server that fills it. Per Decode call: reserve blocks for prompt + output ids,
// answer with a landing ticket (or local_prefill when asked, or when the pool cannot hold the
// prompt right now: the engine then prefills here and waits/preempts as usual), join the
// sequence once its KV landed and verified, stream tokens. Cancellation, deadline, a failed
// transfer and shutdown all free every block the call holds.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "kvcache/transport/kv_server.h"
#include "tandem/internal/v1/worker.pb.h"

namespace grpc {
class Service;
}

namespace tandem {

class WorkerMetrics;

struct DecodeWorkerOptions {
  EngineOptions engine;
  KvServerOptions kv;             // data-plane listener (explicit bind address; port 0 = pick)
  std::string kv_advertise_host;  // host put in tickets; empty = kv.bind_address
  std::string hello_secret;       // data-plane HELLO auth senders must present (may be empty)
  std::string name;               // WorkerInfo.name; empty = the gRPC address
  std::string model_name;
  // How long a landing ticket waits for its KV (from the ticket to END) before the transfer
  // fails and the call ends with UNAVAILABLE.
  std::chrono::milliseconds transfer_timeout{30000};
  uint64_t incarnation_id = 0;       // 0: a random one
  WorkerMetrics* metrics = nullptr;  // not owned; null: no metrics
};

class DecodeWorker {
 public:
  static absl::StatusOr<std::unique_ptr<DecodeWorker>> Create(DecodeWorkerOptions options);
  // Shutdown()s.
  ~DecodeWorker();
  DecodeWorker(const DecodeWorker&) = delete;
  DecodeWorker& operator=(const DecodeWorker&) = delete;

  // DecodeWorker and Worker services, to register on a grpc::ServerBuilder. Owned by this.
  std::vector<grpc::Service*> services();
  // Called once the gRPC server has bound its port (goes into WorkerInfo).
  void SetGrpcAddress(const std::string& address);

  internal::v1::WorkerInfo Info() const;
  internal::v1::WorkerLoad Load() const;  // snapshot, refreshed by the step loop
  uint16_t kv_port() const;

  // Stops taking new Decode calls (UNAVAILABLE "draining"); running ones go on.
  void StartDrain();
  bool draining() const;
  // Decode calls not yet finished.
  int in_flight() const;
  // False once the step loop has stalled (work pending, no step finished for
  // `stall_threshold`) or died: health follows the request path.
  bool Healthy(std::chrono::milliseconds stall_threshold = std::chrono::seconds(30)) const;
  // Ends every call (UNAVAILABLE), stops the data plane and the loop. Idempotent.
  void Shutdown();

  // Free and total KV blocks (tests check that every block came back).
  int32_t free_blocks() const;
  int32_t total_blocks() const;
  // BlockPool::CheckInvariants of the KV pool: "" when consistent.
  std::string CheckKvInvariants() const;

  class Impl;

 private:
  explicit DecodeWorker(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tandem
