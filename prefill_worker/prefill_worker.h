// Prefill worker: serves PrefillWorker.Prefill and Worker.GetInfo. Owns an engine driven by one
// step-loop thread that batches prompts (chunked prefill within the token budget) and streams
// each prompt's KV, layer by layer as it is computed, through the data-plane client to the
// decode worker named in the request's landing ticket; returns the first sampled token.
// Cancellation, deadlines and shutdown abort the transfer (ABORT frame) and free the blocks.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "kvcache/transport/kv_client.h"
#include "tandem/internal/v1/worker.pb.h"

namespace grpc {
class Service;
}

namespace tandem {

class WorkerMetrics;

struct PrefillWorkerOptions {
  EngineOptions engine;
  KvClientOptions kv;  // data-plane sender (HELLO auth, TLS, timeouts)
  std::string name;    // WorkerInfo.name; empty = the gRPC address
  std::string model_name;
  uint64_t incarnation_id = 0;       // 0: a random one
  WorkerMetrics* metrics = nullptr;  // not owned; null: no metrics
};

class PrefillWorker {
 public:
  static absl::StatusOr<std::unique_ptr<PrefillWorker>> Create(PrefillWorkerOptions options);
  ~PrefillWorker();
  PrefillWorker(const PrefillWorker&) = delete;
  PrefillWorker& operator=(const PrefillWorker&) = delete;

  std::vector<grpc::Service*> services();  // PrefillWorker and Worker; owned by this
  void SetGrpcAddress(const std::string& address);

  internal::v1::WorkerInfo Info() const;
  internal::v1::WorkerLoad Load() const;

  void StartDrain();
  bool draining() const;
  int in_flight() const;
  bool Healthy(std::chrono::milliseconds stall_threshold = std::chrono::seconds(30)) const;
  void Shutdown();

  int32_t free_blocks() const;  // free KV blocks (prefix-cached blocks count as free)
  int32_t total_blocks() const;
  // BlockPool::CheckInvariants of the KV pool: "" when consistent.
  std::string CheckKvInvariants() const;

  class Impl;

 private:
  explicit PrefillWorker(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tandem
