// Worker side of the registry (DESIGN §3): registers with the router, then sends a heartbeat
// with the worker's load every interval the router asked for; registers again when the router
// forgets it (restart) and retries while the router is unreachable. One thread per process.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "tandem/internal/v1/worker.pb.h"

namespace tandem {

struct RegistrationOptions {
  std::string router_address;  // "host:port"
  std::function<internal::v1::WorkerInfo()> info;
  std::function<internal::v1::WorkerLoad()> load;
  std::function<bool()> draining;
  std::chrono::milliseconds retry_interval{500};
  std::chrono::milliseconds rpc_timeout{2000};
};

class RegistrationClient {
 public:
  explicit RegistrationClient(RegistrationOptions options);
  // Stops the thread (sends nothing more; the router evicts after missed heartbeats, or sooner
  // when the last heartbeat said draining).
  ~RegistrationClient();
  RegistrationClient(const RegistrationClient&) = delete;
  RegistrationClient& operator=(const RegistrationClient&) = delete;

  bool registered() const;
  // Waits until registered (true) or `timeout` passed (false).
  bool WaitRegistered(std::chrono::milliseconds timeout) const;
  // Sends a heartbeat now (e.g. right after draining starts) instead of at the next interval.
  void Poke();

  class Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace tandem
