// The router's view of its workers (DESIGN §3): registered workers (Register + Heartbeat) and
// static ones (polled through Worker.GetInfo), their reported load, the router's own in-flight
// work to each, and the choice of a worker for a request. One background thread evicts workers
// that missed their heartbeats and polls the static ones every interval.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "kvcache/block_pool.h"
#include "router/internal/prefix_affinity.h"
#include "router/router.h"
#include "tandem/internal/v1/worker.grpc.pb.h"

namespace tandem {

// The gRPC channel and stubs of one worker address. Shared by the pool and the calls in flight,
// so a call outlives the eviction of its worker; the pool drops it last (see retired_).
struct WorkerEndpoint {
  explicit WorkerEndpoint(const std::string& address);
  std::string address;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<internal::v1::DecodeWorker::Stub> decode;
  std::unique_ptr<internal::v1::PrefillWorker::Stub> prefill;
  std::unique_ptr<internal::v1::Worker::Stub> worker;
};

// Something that runs on a worker and must hear when the worker leaves the pool (evicted, or
// replaced by a new incarnation). Retain/Release keep the watcher alive across the notification.
class WorkerWatcher {
 public:
  virtual void Retain() = 0;
  virtual void Release() = 0;
  virtual void WorkerLost(const std::string& reason) = 0;

 protected:
  ~WorkerWatcher() = default;
};

// A worker picked for one call, with what the router counted in flight to it.
struct WorkerLease {
  std::string key;  // the registered name, or the address of a static worker
  uint64_t entry_id = 0;
  std::shared_ptr<WorkerEndpoint> endpoint;
  int64_t blocks = 0;         // decode: KV blocks counted in flight
  int64_t tokens = 0;         // prefill: prompt tokens counted in flight
  int64_t cached_tokens = 0;  // prefill: estimated prefix-cache hit
  bool acknowledged = false;  // decode: the worker answered (ticket or local prefill)
};

struct WorkerPoolOptions {
  uint64_t fingerprint = 0;
  std::vector<StaticWorker> static_workers;
  std::chrono::milliseconds heartbeat_interval{500};
  int missed_heartbeats = 3;
  size_t affinity_blocks = 16384;  // per prefill worker
};

class WorkerPool {
 public:
  explicit WorkerPool(WorkerPoolOptions options);
  ~WorkerPool();  // Stop()
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Starts the background thread (eviction, static polling). Stop() ends it, cancels the polls
  // in flight and waits for them. Idempotent.
  void Start();
  void Stop();

  // Registry.Register: FAILED_PRECONDITION on a fingerprint mismatch, INVALID_ARGUMENT on a
  // malformed WorkerInfo. A new incarnation under a known name replaces the old one, whose calls
  // in flight hear WorkerLost.
  absl::Status Register(const internal::v1::WorkerInfo& info);
  // Registry.Heartbeat: false when this incarnation is not registered.
  bool Heartbeat(const internal::v1::HeartbeatRequest& request);

  // The decode worker for a sequence of `tokens` (prompt + max_tokens): usable (up, not draining,
  // same model), most free KV blocks net of the router's calls not yet reflected in its load,
  // then smallest running batch. Workers in `avoid` only when no other is usable. Counts the
  // call in flight and registers `watcher`; DecodeEnded undoes both.
  std::optional<WorkerLease> PickDecode(int64_t tokens, const std::vector<std::string>& avoid,
                                        WorkerWatcher* watcher);
  // The decode worker answered: its reservation is in its own free-block count from its next
  // load report on.
  void DecodeAcknowledged(WorkerLease* lease);
  void DecodeEnded(const WorkerLease& lease, WorkerWatcher* watcher);

  // Whether a prefill worker outside `avoid` is usable.
  bool HasPrefill(const std::vector<std::string>& avoid) const;
  // The prefill worker with the least prompt work ahead (queued prefill tokens + the router's
  // own in flight - the estimated prefix-cache hit of `block_hashes`), never one in `avoid`.
  std::optional<WorkerLease> PickPrefill(std::span<const BlockHash> block_hashes, int64_t tokens,
                                         const std::vector<std::string>& avoid,
                                         WorkerWatcher* watcher);
  void PrefillEnded(const WorkerLease& lease, WorkerWatcher* watcher);

  std::vector<WorkerView> Views() const;
  // Waits until `pred` holds for the views (true) or `timeout` passed (false).
  bool AwaitViews(const std::function<bool(const std::vector<WorkerView>&)>& pred,
                  std::chrono::milliseconds timeout) const;

 private:
  using Clock = std::chrono::steady_clock;
  struct Entry;
  struct Poll;

  void Run();
  // Removes registered workers whose heartbeats stopped; returns the watchers to notify.
  void EvictExpiredLocked(Clock::time_point now,
                          std::vector<std::pair<WorkerWatcher*, std::string>>* lost)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void StartPoll(const std::string& key, std::shared_ptr<WorkerEndpoint> endpoint);
  void OnPolled(Poll* poll, const grpc::Status& status);
  static void TakeWatchers(Entry& entry, const std::string& reason,
                           std::vector<std::pair<WorkerWatcher*, std::string>>* lost);
  static void NotifyLost(std::vector<std::pair<WorkerWatcher*, std::string>>& lost);
  Entry* FindLocked(const WorkerLease& lease) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<WorkerView> ViewsLocked() const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  static bool Usable(const Entry& e, internal::v1::Role role);

  const WorkerPoolOptions options_;
  mutable absl::Mutex mu_;
  std::map<std::string, std::unique_ptr<Entry>> entries_ ABSL_GUARDED_BY(mu_);
  uint64_t next_entry_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // GetInfo calls in flight; a poll is freed once its callback ran and nobody pins it.
  std::unordered_map<Poll*, std::shared_ptr<Poll>> polls_ ABSL_GUARDED_BY(mu_);
  // Endpoints of evicted or replaced workers, kept until no call uses them so that a channel is
  // only ever destroyed by this thread or the destructor, never inside a gRPC callback (gRPC
  // cannot shut its callback machinery down from its own thread).
  std::vector<std::shared_ptr<WorkerEndpoint>> retired_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace tandem
