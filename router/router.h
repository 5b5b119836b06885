// Router: the front door. Serves tandem.v1.Tandem (Generate, Tokenize, ListModels) and
// tandem.internal.v1.Registry. Validates and tokenizes requests, admits them through a bounded
// queue, picks a decode worker (free KV blocks, running batch) and a prefill worker (queued
// prefill tokens, prefix-cache affinity), and relays tokens to the client with incremental
// detokenization and stop strings. Failures are retried as re-admission with the tokens
// already sent (DESIGN §2); after max_attempts the client gets UNAVAILABLE.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tandem/internal/v1/worker.pb.h"

namespace grpc {
class Service;
}

namespace tandem {

class RouterMetrics;

struct StaticWorker {
  std::string address;  // gRPC "host:port"; the router polls Worker.GetInfo there
  internal::v1::Role role = internal::v1::ROLE_UNSPECIFIED;
};

struct RouterOptions {
  std::string model_dir;   // config.json, tokenizer, weight headers (for the fingerprint)
  std::string model_name;  // the served name; empty = the folder's name
  std::vector<StaticWorker> static_workers;
  std::chrono::milliseconds heartbeat_interval{500};  // told to workers at Register
  int missed_heartbeats = 3;                          // then the worker is evicted
  int max_running = 256;   // requests dispatched to workers at once
  int max_queued = 1024;   // requests waiting for a slot; beyond: RESOURCE_EXHAUSTED
  int max_attempts = 3;    // dispatch attempts per request (first one included)
  std::chrono::milliseconds request_timeout{0};  // 0: only the client's deadline applies
  bool disaggregated = true;  // false: decode workers prefill locally (colocated mode)
  RouterMetrics* metrics = nullptr;  // not owned; null: no metrics
};

// A worker as the router sees it (tests, metrics).
struct WorkerView {
  internal::v1::WorkerInfo info;
  internal::v1::WorkerLoad load;
  bool up = false;
  bool draining = false;
  bool is_static = false;
};

class Router {
 public:
  static absl::StatusOr<std::unique_ptr<Router>> Create(RouterOptions options);
  ~Router();
  Router(const Router&) = delete;
  Router& operator=(const Router&) = delete;

  std::vector<grpc::Service*> services();  // Tandem and Registry; owned by this

  std::vector<WorkerView> Workers() const;
  // Waits until `pred` holds for Workers() (true) or `timeout` passed (false); e.g. for the first
  // decode worker to register. `pred` runs under the registry's lock: keep it short.
  bool AwaitWorkers(const std::function<bool(const std::vector<WorkerView>&)>& pred,
                    std::chrono::milliseconds timeout) const;
  // New Generate calls get UNAVAILABLE "draining"; running ones go on.
  void StartDrain();
  bool draining() const;
  int in_flight() const;  // Generate calls not finished (queued + running)
  // Waits until `pred(in_flight())` holds (true) or `timeout` passed (false); e.g. a drain
  // waiting for 0. `pred` runs under a lock: keep it short.
  bool AwaitInFlight(const std::function<bool(int)>& pred, std::chrono::milliseconds timeout) const;
  // Cancels every call and stops the background threads. Idempotent. The gRPC server serving
  // services() must stop before the Router is destroyed.
  void Shutdown();

  class Impl;

 private:
  explicit Router(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tandem
