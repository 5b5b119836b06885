// Admission control: see admission.h.
#include "router/internal/admission.h"

namespace tandem {

AdmissionQueue::AdmissionQueue(int max_running, int max_queued)
    : max_running_(max_running), max_queued_(max_queued) {}

AdmissionQueue::Entry AdmissionQueue::Enter(Waiter* waiter) {
  absl::MutexLock lock(&mu_);
  if (running_ < max_running_ && queue_.empty()) {
    ++running_;
    NotifyLocked();
    return Entry::kAdmitted;
  }
  if (static_cast<int>(queue_.size()) < max_queued_) {
    waiter->pos_ = queue_.insert(queue_.end(), waiter);
    waiter->queued_ = true;
    NotifyLocked();
    return Entry::kQueued;
  }
  return Entry::kRejected;
}

bool AdmissionQueue::Remove(Waiter* waiter) {
  absl::MutexLock lock(&mu_);
  if (!waiter->queued_) {
    return false;
  }
  queue_.erase(waiter->pos_);
  waiter->queued_ = false;
  NotifyLocked();
  return true;
}

void AdmissionQueue::Release() {
  Waiter* next = nullptr;
  {
    absl::MutexLock lock(&mu_);
    if (queue_.empty()) {
      --running_;
      NotifyLocked();
      return;
    }
    // The slot passes to the oldest waiter; running_ stays.
    next = queue_.front();
    queue_.pop_front();
    next->queued_ = false;
    NotifyLocked();
  }
  next->Admitted();
}

void AdmissionQueue::SetObserver(std::function<void(int, int)> observer) {
  absl::MutexLock lock(&mu_);
  observer_ = std::move(observer);
}

int AdmissionQueue::running() const {
  absl::MutexLock lock(&mu_);
  return running_;
}

int AdmissionQueue::queued() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(queue_.size());
}

}  // namespace tandem
