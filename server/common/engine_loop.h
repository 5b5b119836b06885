// The step loop both worker roles run: one thread owns the engine (it is single-threaded) and
// talks to gRPC threads and data-plane callbacks through a command inbox. Each turn it runs the
// queued commands, one engine Step() while there is work, routes the step's token events to the
// calls that watch their sequences, and refreshes a load snapshot; with nothing to do it waits
// on the inbox. It also tracks the loop's health (DESIGN §9: health follows the request path).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"
#include "engine/engine.h"

namespace tandem {

class WorkerMetrics;

// Receives the token events of one engine sequence (loop thread).
class SequenceObserver {
 public:
  virtual ~SequenceObserver() = default;
  // An event whose finish is set or whose status is not OK is the sequence's last: the loop
  // forgets the observer before delivering it. Other observers (e.g. of a prefill-only sequence
  // that leaves after its first token) call EngineLoop::Unwatch themselves.
  virtual void OnTokenEvent(TokenEvent& event) = 0;
};

struct EngineLoopOptions {
  std::string role;  // for logs: "decode", "prefill"
  // Loop thread, on every load refresh: adds what the engine does not know about (the decode
  // worker's sequences whose KV is still landing).
  std::function<void(EngineLoad*)> adjust_load;
  WorkerMetrics* metrics = nullptr;  // optional; not owned
};

class EngineLoop {
 public:
  using Command = absl::AnyInvocable<void()>;

  EngineLoop(std::unique_ptr<Engine> engine, EngineLoopOptions options);
  // Stop()s (with no final command) if still running.
  ~EngineLoop();
  EngineLoop(const EngineLoop&) = delete;
  EngineLoop& operator=(const EngineLoop&) = delete;

  // Starts the thread. Commands posted before run once it starts.
  void Start();

  // The engine: loop thread only, except for what never changes after Create (model, config,
  // options, the KV store layout) and the thread-safe block pool.
  Engine& engine() { return *engine_; }
  const Engine& engine() const { return *engine_; }

  // Queues `command` for the loop thread. Returns false (and drops the command) once Stop()
  // has begun; every command accepted before runs, in order.
  bool Post(Command command);

  // Loop thread: routes the events of `seq` to `observer` until its last event.
  void Watch(SeqId seq, SequenceObserver* observer);
  // Loop thread: forgets `seq`'s observer (does not abort the sequence).
  void Unwatch(SeqId seq);

  // Runs `last` on the loop thread after every command accepted before it, then ends the
  // thread and joins it. Idempotent (later calls do not run their `last`). Must not be called
  // from the loop thread.
  void Stop(Command last);

  // Snapshot refreshed by the loop after every turn.
  EngineLoad Load() const;
  // False once the thread is not running, or when it has work (commands or sequences) but has
  // not finished a turn (its commands and one step) for `stall_threshold`; failed steps do not
  // count as finished.
  bool Healthy(std::chrono::milliseconds stall_threshold) const;
  // Steps that failed (each failed every sequence then in the engine).
  int64_t failed_steps() const { return failed_steps_.load(std::memory_order_relaxed); }

 private:
  using Clock = std::chrono::steady_clock;

  void Run();
  enum class StepResult { kProgress, kStarved, kFailed };
  // One engine step, its events routed.
  StepResult RunStep();
  // A step failed: every watched sequence is aborted and ends with INTERNAL.
  void FailAll(const absl::Status& why);
  void RefreshLoad();
  void MarkProgress() {
    progress_ns_.store(Clock::now().time_since_epoch().count(), std::memory_order_relaxed);
  }

  const std::unique_ptr<Engine> engine_;
  const EngineLoopOptions options_;

  mutable absl::Mutex mu_;
  absl::CondVar wake_;
  std::vector<Command> inbox_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool exit_ ABSL_GUARDED_BY(mu_) = false;  // the final command was queued
  EngineLoad load_ ABSL_GUARDED_BY(mu_);

  std::thread thread_;
  bool joined_ = false;  // Stop() caller only
  absl::Mutex stop_mu_;  // serialises Stop()

  // Loop thread only.
  std::unordered_map<SeqId, SequenceObserver*> watchers_;
  std::vector<Command> running_;

  // Health (written by the loop, read anywhere).
  std::atomic<bool> alive_{false};
  std::atomic<bool> busy_{false};        // not waiting idle
  std::atomic<int64_t> progress_ns_{0};  // last finished turn, or when the loop became busy
  std::atomic<int64_t> failed_steps_{0};
};

}  // namespace tandem
