// The workers' step loop: see engine_loop.h.
#include "server/common/engine_loop.h"

#include <cstdio>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "server/common/metrics.h"

namespace tandem {

EngineLoop::EngineLoop(std::unique_ptr<Engine> engine, EngineLoopOptions options)
    : engine_(std::move(engine)), options_(std::move(options)) {}

EngineLoop::~EngineLoop() {
  Stop([] {});
}

void EngineLoop::Start() {
  RefreshLoad();
  alive_.store(true);
  MarkProgress();
  thread_ = std::thread([this] { Run(); });
}

bool EngineLoop::Post(Command command) {
  absl::MutexLock lock(&mu_);
  if (stopping_) {
    return false;
  }
  inbox_.push_back(std::move(command));
  wake_.Signal();
  return true;
}

void EngineLoop::Watch(SeqId seq, SequenceObserver* observer) { watchers_[seq] = observer; }

void EngineLoop::Unwatch(SeqId seq) { watchers_.erase(seq); }

void EngineLoop::Stop(Command last) {
  absl::MutexLock stop_lock(&stop_mu_);
  if (joined_) {
    return;
  }
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    exit_ = true;
    inbox_.push_back(std::move(last));
    wake_.Signal();
  }
  if (thread_.joinable()) {
    thread_.join();
  } else {
    // Never started: run what was queued here.
    std::vector<Command> queued;
    {
      absl::MutexLock lock(&mu_);
      queued.swap(inbox_);
    }
    for (Command& c : queued) c();
  }
  joined_ = true;
}

EngineLoad EngineLoop::Load() const {
  absl::MutexLock lock(&mu_);
  return load_;
}

bool EngineLoop::Healthy(std::chrono::milliseconds stall_threshold) const {
  if (!alive_.load()) {
    return false;
  }
  if (!busy_.load()) {
    return true;
  }
  const int64_t since = Clock::now().time_since_epoch().count() - progress_ns_.load();
  return since <= std::chrono::duration_cast<Clock::duration>(stall_threshold).count();
}

void EngineLoop::Run() {
  // After a step that failed, or that could do nothing (its sequences wait for KV blocks held
  // outside the engine, e.g. reservations for KV still landing), the loop does not spin: it
  // waits for the next command, which usually brings the blocks back, or a short while (the
  // data plane may return a landing's last reference without a command).
  std::optional<absl::Duration> backoff;
  for (;;) {
    bool exit = false;
    {
      absl::MutexLock lock(&mu_);
      if (inbox_.empty() && (backoff || !engine_->HasWork())) {
        if (!engine_->HasWork()) {
          busy_.store(false);
#ifndef NDEBUG
          // Idle invariant (DESIGN §9), checked whenever the worker goes idle in debug builds.
          if (std::string bad = engine_->pool().CheckInvariants(); !bad.empty()) {
            std::fprintf(stderr, "%s worker: KV pool invariant broken: %s\n", options_.role.c_str(),
                         bad.c_str());
          }
#endif
          while (inbox_.empty()) wake_.Wait(&mu_);
        } else {
          wake_.WaitWithTimeout(&mu_, *backoff);
        }
      }
      running_.swap(inbox_);
      exit = exit_;
    }
    // Busy from here until the loop waits idle again; every turn that ends without a failed
    // step counts as progress (a command or a step that hangs does not).
    if (!busy_.exchange(true)) {
      MarkProgress();
    }
    backoff.reset();
    for (Command& c : running_) c();
    running_.clear();
    if (exit) {
      // The final command ran (nothing is accepted after it).
      RefreshLoad();
      alive_.store(false);
      return;
    }
    bool progressed = true;
    if (engine_->HasWork()) {
      switch (RunStep()) {
        case StepResult::kProgress:
          break;
        case StepResult::kStarved:
          backoff = absl::Milliseconds(5);
          break;
        case StepResult::kFailed:
          backoff = absl::Milliseconds(100);
          progressed = false;
          break;
      }
    }
    RefreshLoad();
    if (progressed) {
      MarkProgress();
    }
  }
}

EngineLoop::StepResult EngineLoop::RunStep() {
  StepStats stats;
  auto events = engine_->Step(&stats);
  if (!events.ok()) {
    failed_steps_.fetch_add(1, std::memory_order_relaxed);
    std::fprintf(stderr, "%s worker: engine step failed: %s\n", options_.role.c_str(),
                 events.status().ToString().c_str());
    FailAll(events.status());
    return StepResult::kFailed;
  }
  if (options_.metrics != nullptr) {
    options_.metrics->ObserveStep(stats);
  }
  for (TokenEvent& ev : *events) {
    auto it = watchers_.find(ev.seq);
    if (it == watchers_.end()) {
      continue;  // aborted meanwhile
    }
    SequenceObserver* observer = it->second;
    if (ev.finish != FinishReason::kNone || !ev.status.ok()) {
      watchers_.erase(it);
    }
    observer->OnTokenEvent(ev);
  }
  const bool idle_step = events->empty() && stats.prefill_tokens == 0 && stats.decode_tokens == 0;
  return idle_step ? StepResult::kStarved : StepResult::kProgress;
}

void EngineLoop::FailAll(const absl::Status& why) {
  std::unordered_map<SeqId, SequenceObserver*> watchers;
  watchers.swap(watchers_);
  const absl::Status status =
      absl::InternalError(absl::StrCat("engine step failed: ", why.message()));
  for (const auto& [seq, observer] : watchers) {
    engine_->Abort(seq);
  }
  for (const auto& [seq, observer] : watchers) {
    TokenEvent ev;
    ev.seq = seq;
    ev.finish = FinishReason::kAbort;
    ev.status = status;
    observer->OnTokenEvent(ev);
  }
}

void EngineLoop::RefreshLoad() {
  EngineLoad load = engine_->Load();
  if (options_.adjust_load) {
    options_.adjust_load(&load);
  }
  if (options_.metrics != nullptr) {
    options_.metrics->UpdateLoad(load);
  }
  absl::MutexLock lock(&mu_);
  load_ = load;
}

}  // namespace tandem
