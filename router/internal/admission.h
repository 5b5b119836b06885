// Admission control of the router: at most `max_running` requests dispatched to workers, at most
// `max_queued` waiting for a slot in arrival order; anything beyond is refused at once, so an
// overload never disturbs the requests already admitted.
#pragma once

#include <cstdint>
#include <functional>
#include <list>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace tandem {

class AdmissionQueue {
 public:
  // A queued request. Admitted() runs on the thread that freed the slot, with no lock held; from
  // then on the waiter holds a slot and must Release() it exactly once.
  class Waiter {
   public:
    virtual void Admitted() = 0;

   protected:
    ~Waiter() = default;

   private:
    friend class AdmissionQueue;
    bool queued_ = false;
    std::list<Waiter*>::iterator pos_;
  };

  enum class Entry { kAdmitted, kQueued, kRejected };

  AdmissionQueue(int max_running, int max_queued);
  AdmissionQueue(const AdmissionQueue&) = delete;
  AdmissionQueue& operator=(const AdmissionQueue&) = delete;

  // kAdmitted: the caller holds a slot now. kQueued: Admitted() follows (maybe before Enter
  // returns, on another thread) unless Remove() takes the waiter out first. kRejected: full.
  Entry Enter(Waiter* waiter);
  // Takes a queued waiter out; false when it is not queued (already admitted, or never was).
  bool Remove(Waiter* waiter);
  // Gives a slot back; the oldest waiter, if any, gets it (its Admitted() runs on this thread).
  void Release();

  int running() const;
  int queued() const;
  // Called with (running, queued) after every change, under the queue's lock: keep it cheap
  // (it sets two gauges). Set before the first Enter().
  void SetObserver(std::function<void(int running, int queued)> observer);

 private:
  const int max_running_;
  const int max_queued_;
  mutable absl::Mutex mu_;
  int running_ ABSL_GUARDED_BY(mu_) = 0;
  std::list<Waiter*> queue_ ABSL_GUARDED_BY(mu_);  // front = oldest
  std::function<void(int, int)> observer_;
  void NotifyLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (observer_) observer_(running_, static_cast<int>(queue_.size()));
  }
};

}  // namespace tandem
