// Worker registry, load view and worker choice: see worker_pool.h.
#include "router/internal/worker_pool.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstdio>
#include <limits>

#include "absl/strings/str_cat.h"
#include "proto/convert.h"

namespace tandem {

using internal::v1::Role;

namespace {

constexpr int32_t kDefaultBlockSize = 16;

const char* RoleName(Role role) {
  switch (role) {
    case internal::v1::ROLE_PREFILL:
      return "prefill";
    case internal::v1::ROLE_DECODE:
      return "decode";
    default:
      return "unknown";
  }
}

bool Avoided(const std::vector<std::string>& avoid, const std::string& key) {
  return std::find(avoid.begin(), avoid.end(), key) != avoid.end();
}

}  // namespace

WorkerEndpoint::WorkerEndpoint(const std::string& addr)
    : address(addr),
      channel(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials())),
      decode(internal::v1::DecodeWorker::NewStub(channel)),
      prefill(internal::v1::PrefillWorker::NewStub(channel)),
      worker(internal::v1::Worker::NewStub(channel)) {}

struct WorkerPool::Entry {
  Entry(std::string k, size_t affinity_blocks) : key(std::move(k)), affinity(affinity_blocks) {}

  std::string key;
  uint64_t id = 0;
  internal::v1::WorkerInfo info;
  internal::v1::WorkerLoad load;
  Role static_role = internal::v1::ROLE_UNSPECIFIED;  // static workers: the configured role
  bool is_static = false;
  bool up = false;
  bool draining = false;
  std::string down_reason;  // static workers
  Clock::time_point last_seen;
  std::shared_ptr<WorkerEndpoint> endpoint;
  bool poll_in_flight = false;

  // The router's own work to this worker that its last load report may not show yet.
  int64_t pending_blocks = 0;  // decode calls opened, not answered
  int64_t acked_blocks = 0;    // answered since the last load report
  int32_t pending_requests = 0;
  int32_t acked_requests = 0;
  int64_t inflight_prefill_tokens = 0;  // Prefill calls not finished
  PrefixAffinity affinity;

  std::unordered_set<WorkerWatcher*> watchers;

  Role role() const { return is_static ? static_role : info.role(); }
  // A load report arrived: from now on it includes what the worker acknowledged before.
  void LoadReported(const internal::v1::WorkerLoad& l) {
    load = l;
    acked_blocks = 0;
    acked_requests = 0;
  }
};

struct WorkerPool::Poll {
  std::string key;
  std::shared_ptr<WorkerEndpoint> endpoint;
  grpc::ClientContext context;
  internal::v1::GetInfoRequest request;
  internal::v1::GetInfoResponse response;
};

WorkerPool::WorkerPool(WorkerPoolOptions options) : options_(std::move(options)) {
  absl::MutexLock lock(&mu_);
  for (const StaticWorker& w : options_.static_workers) {
    auto e = std::make_unique<Entry>(w.address, options_.affinity_blocks);
    e->id = next_entry_id_++;
    e->is_static = true;
    e->static_role = w.role;
    e->info.set_name(w.address);
    e->info.set_grpc_address(w.address);
    e->info.set_role(w.role);
    e->down_reason = "not polled yet";
    e->endpoint = std::make_shared<WorkerEndpoint>(w.address);
    entries_[w.address] = std::move(e);
  }
}

WorkerPool::~WorkerPool() { Stop(); }

void WorkerPool::Start() {
  absl::MutexLock lock(&mu_);
  if (started_ || stopping_) {
    return;
  }
  started_ = true;
  thread_ = std::thread([this] { Run(); });
}

void WorkerPool::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (thread_.joinable()) {
    thread_.join();
  }
  // No poll starts any more. Cancel those in flight (outside the lock: gRPC may run a callback
  // inline, and callbacks take mu_), each pinned by a reference of ours, then wait for them.
  std::vector<std::shared_ptr<Poll>> polls;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [raw, poll] : polls_) {
      polls.push_back(poll);
    }
  }
  for (auto& poll : polls) {
    poll->context.TryCancel();
  }
  polls.clear();
  absl::MutexLock lock(&mu_);
  auto no_polls = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return polls_.empty(); };
  mu_.Await(absl::Condition(&no_polls));
}

void WorkerPool::Run() {
  for (;;) {
    std::vector<std::pair<WorkerWatcher*, std::string>> lost;
    std::vector<std::pair<std::string, std::shared_ptr<WorkerEndpoint>>> polls;
    std::vector<std::shared_ptr<WorkerEndpoint>> unused;  // destroyed here, outside the lock
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) {
        return;
      }
      EvictExpiredLocked(Clock::now(), &lost);
      // A retired endpoint nobody else holds can go; nobody can take it again.
      for (auto it = retired_.begin(); it != retired_.end();) {
        if (it->use_count() == 1) {
          unused.push_back(std::move(*it));
          it = retired_.erase(it);
        } else {
          ++it;
        }
      }
      for (auto& [key, e] : entries_) {
        if (e->is_static && !e->poll_in_flight) {
          e->poll_in_flight = true;
          polls.emplace_back(key, e->endpoint);
        }
      }
    }
    unused.clear();
    NotifyLost(lost);
    for (auto& [key, endpoint] : polls) {
      StartPoll(key, std::move(endpoint));
    }
    absl::MutexLock lock(&mu_);
    auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
    if (mu_.AwaitWithTimeout(absl::Condition(&stop),
                             absl::FromChrono(options_.heartbeat_interval))) {
      return;
    }
  }
}

void WorkerPool::EvictExpiredLocked(Clock::time_point now,
                                    std::vector<std::pair<WorkerWatcher*, std::string>>* lost) {
  for (auto it = entries_.begin(); it != entries_.end();) {
    Entry& e = *it->second;
    // A draining worker that goes quiet is on its way out: one missed interval is enough.
    const int missed = e.draining ? 1 : options_.missed_heartbeats;
    if (e.is_static || now - e.last_seen <= options_.heartbeat_interval * missed) {
      ++it;
      continue;
    }
    std::fprintf(stderr, "router: %s worker %s evicted (no heartbeat for %d intervals)\n",
                 RoleName(e.role()), e.key.c_str(), missed);
    TakeWatchers(e, absl::StrCat(RoleName(e.role()), " worker ", e.key, " evicted"), lost);
    retired_.push_back(std::move(e.endpoint));
    it = entries_.erase(it);
  }
}

void WorkerPool::StartPoll(const std::string& key, std::shared_ptr<WorkerEndpoint> endpoint) {
  auto owned = std::make_shared<Poll>();
  Poll* poll = owned.get();
  poll->key = key;
  poll->endpoint = std::move(endpoint);
  poll->context.set_deadline(std::chrono::system_clock::now() + options_.heartbeat_interval);
  {
    absl::MutexLock lock(&mu_);
    polls_.emplace(poll, std::move(owned));
  }
  poll->endpoint->worker->async()->GetInfo(&poll->context, &poll->request, &poll->response,
                                           [this, poll](grpc::Status s) { OnPolled(poll, s); });
}

void WorkerPool::OnPolled(Poll* poll, const grpc::Status& status) {
  std::shared_ptr<Poll> owned;  // freed after the lock is released
  {
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(poll->key);
    if (it != entries_.end()) {
      Entry& e = *it->second;
      e.poll_in_flight = false;
      const internal::v1::WorkerInfo& info = poll->response.info();
      std::string reason;
      if (!status.ok()) {
        reason = absl::StrCat("GetInfo failed (", status.error_code(), ")");
      } else if (info.role() != e.static_role) {
        reason = absl::StrCat("serves role ", RoleName(info.role()), ", configured as ",
                              RoleName(e.static_role));
      } else if (info.model_fingerprint() != options_.fingerprint) {
        reason = absl::StrCat("model fingerprint mismatch: worker serves ",
                              FingerprintHex(info.model_fingerprint()), ", router ",
                              FingerprintHex(options_.fingerprint));
      }
      const bool was_up = e.up;
      e.up = reason.empty();
      if (e.up) {
        e.info = info;
        if (e.info.name().empty()) {
          e.info.set_name(e.key);
        }
        e.info.set_grpc_address(e.key);
        e.draining = poll->response.draining();
        e.last_seen = Clock::now();
        e.LoadReported(poll->response.load());
        e.down_reason.clear();
      }
      if (was_up != e.up || (!e.up && reason != e.down_reason)) {
        std::fprintf(stderr, "router: static %s worker %s is %s%s%s\n", RoleName(e.static_role),
                     e.key.c_str(), e.up ? "up" : "down", e.up ? "" : ": ", reason.c_str());
      }
      if (!e.up) {
        e.down_reason = reason;
      }
    }
    auto p = polls_.find(poll);
    owned = std::move(p->second);
    polls_.erase(p);
  }
}

absl::Status WorkerPool::Register(const internal::v1::WorkerInfo& given) {
  internal::v1::WorkerInfo info = given;
  if (info.role() != internal::v1::ROLE_PREFILL && info.role() != internal::v1::ROLE_DECODE) {
    return absl::InvalidArgumentError("info.role: must be ROLE_PREFILL or ROLE_DECODE");
  }
  if (info.grpc_address().empty()) {
    return absl::InvalidArgumentError("info.grpc_address: must not be empty");
  }
  if (info.incarnation_id() == 0) {
    return absl::InvalidArgumentError("info.incarnation_id: must not be 0");
  }
  if (info.name().empty()) {
    info.set_name(info.grpc_address());
  }
  if (info.model_fingerprint() != options_.fingerprint) {
    return absl::FailedPreconditionError(
        absl::StrCat("model fingerprint mismatch: worker ", info.name(), " serves ",
                     FingerprintHex(info.model_fingerprint()), ", router ",
                     FingerprintHex(options_.fingerprint)));
  }
  std::vector<std::pair<WorkerWatcher*, std::string>> lost;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) {
      return absl::UnavailableError("router shutting down");
    }
    auto it = entries_.find(info.name());
    if (it != entries_.end() && it->second->is_static) {
      return absl::AlreadyExistsError(
          absl::StrCat("info.name: '", info.name(), "' is a static worker of this router"));
    }
    if (it != entries_.end() && it->second->info.incarnation_id() == info.incarnation_id() &&
        it->second->info.role() == info.role() &&
        it->second->info.grpc_address() == info.grpc_address()) {
      // The same process registering again (e.g. its Register response was lost).
      it->second->info = info;
      it->second->last_seen = Clock::now();
      return absl::OkStatus();
    }
    if (it != entries_.end()) {
      // A restarted worker is a new worker: nothing of the old incarnation survives.
      std::fprintf(stderr, "router: %s worker %s replaced by a new incarnation\n",
                   RoleName(it->second->role()), info.name().c_str());
      TakeWatchers(
          *it->second,
          absl::StrCat(RoleName(it->second->role()), " worker ", info.name(), " restarted"), &lost);
      retired_.push_back(std::move(it->second->endpoint));
      entries_.erase(it);
    }
    auto e = std::make_unique<Entry>(info.name(), options_.affinity_blocks);
    e->id = next_entry_id_++;
    e->info = info;
    e->up = true;
    e->last_seen = Clock::now();
    e->endpoint = std::make_shared<WorkerEndpoint>(info.grpc_address());
    std::fprintf(stderr, "router: %s worker %s registered (%s, %s)\n", RoleName(info.role()),
                 info.name().c_str(), info.grpc_address().c_str(), info.backend().c_str());
    entries_[info.name()] = std::move(e);
  }
  NotifyLost(lost);
  return absl::OkStatus();
}

bool WorkerPool::Heartbeat(const internal::v1::HeartbeatRequest& request) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(request.name());
  if (it == entries_.end() || it->second->is_static ||
      it->second->info.incarnation_id() != request.incarnation_id()) {
    return false;
  }
  Entry& e = *it->second;
  e.last_seen = Clock::now();
  e.draining = request.draining();
  e.LoadReported(request.load());
  return true;
}

bool WorkerPool::Usable(const Entry& e, Role role) {
  return e.up && !e.draining && e.role() == role;
}

std::optional<WorkerLease> WorkerPool::PickDecode(int64_t tokens,
                                                  const std::vector<std::string>& avoid,
                                                  WorkerWatcher* watcher) {
  absl::MutexLock lock(&mu_);
  Entry* best = nullptr;
  bool best_avoided = true;
  int64_t best_free = 0;
  int64_t best_batch = 0;
  for (auto& [key, e] : entries_) {
    if (!Usable(*e, internal::v1::ROLE_DECODE)) {
      continue;
    }
    const bool avoided = Avoided(avoid, key);
    const int64_t free = int64_t{e->load.free_kv_blocks()} - e->pending_blocks - e->acked_blocks;
    const int64_t batch = int64_t{e->load.running_sequences()} + e->load.waiting_sequences() +
                          e->pending_requests + e->acked_requests;
    const bool better = best == nullptr || (best_avoided && !avoided) ||
                        (avoided == best_avoided &&
                         (free > best_free || (free == best_free && batch < best_batch)));
    if (better) {
      best = e.get();
      best_avoided = avoided;
      best_free = free;
      best_batch = batch;
    }
  }
  if (best == nullptr) {
    return std::nullopt;
  }
  const int32_t block_size = best->info.kv_layout().block_size() > 0
                                 ? best->info.kv_layout().block_size()
                                 : kDefaultBlockSize;
  WorkerLease lease;
  lease.key = best->key;
  lease.entry_id = best->id;
  lease.endpoint = best->endpoint;
  lease.blocks = (tokens + block_size - 1) / block_size;
  best->pending_blocks += lease.blocks;
  best->pending_requests += 1;
  best->watchers.insert(watcher);
  return lease;
}

WorkerPool::Entry* WorkerPool::FindLocked(const WorkerLease& lease) {
  auto it = entries_.find(lease.key);
  if (it == entries_.end() || it->second->id != lease.entry_id) {
    return nullptr;  // evicted or replaced: its counters went with it
  }
  return it->second.get();
}

void WorkerPool::DecodeAcknowledged(WorkerLease* lease) {
  absl::MutexLock lock(&mu_);
  if (lease->acknowledged) {
    return;
  }
  lease->acknowledged = true;
  if (Entry* e = FindLocked(*lease)) {
    e->pending_blocks -= lease->blocks;
    e->pending_requests -= 1;
    e->acked_blocks += lease->blocks;
    e->acked_requests += 1;
  }
}

void WorkerPool::DecodeEnded(const WorkerLease& lease, WorkerWatcher* watcher) {
  absl::MutexLock lock(&mu_);
  if (Entry* e = FindLocked(lease)) {
    if (!lease.acknowledged) {
      e->pending_blocks -= lease.blocks;
      e->pending_requests -= 1;
    }
    e->watchers.erase(watcher);
  }
}

bool WorkerPool::HasPrefill(const std::vector<std::string>& avoid) const {
  absl::MutexLock lock(&mu_);
  for (const auto& [key, e] : entries_) {
    if (Usable(*e, internal::v1::ROLE_PREFILL) && !Avoided(avoid, key)) {
      return true;
    }
  }
  return false;
}

std::optional<WorkerLease> WorkerPool::PickPrefill(std::span<const BlockHash> block_hashes,
                                                   int64_t tokens,
                                                   const std::vector<std::string>& avoid,
                                                   WorkerWatcher* watcher) {
  absl::MutexLock lock(&mu_);
  Entry* best = nullptr;
  int64_t best_cost = std::numeric_limits<int64_t>::max();
  int64_t best_hit = 0;
  for (auto& [key, e] : entries_) {
    if (!Usable(*e, internal::v1::ROLE_PREFILL) || Avoided(avoid, key)) {
      continue;
    }
    const int64_t hit =
        std::min<int64_t>(tokens, static_cast<int64_t>(e->affinity.MatchedBlocks(block_hashes)) *
                                      kAffinityBlockTokens);
    const int64_t cost = e->load.queued_prefill_tokens() + e->inflight_prefill_tokens - hit;
    if (best == nullptr || cost < best_cost) {
      best = e.get();
      best_cost = cost;
      best_hit = hit;
    }
  }
  if (best == nullptr) {
    return std::nullopt;
  }
  best->affinity.Record(block_hashes);
  WorkerLease lease;
  lease.key = best->key;
  lease.entry_id = best->id;
  lease.endpoint = best->endpoint;
  lease.tokens = tokens;
  lease.cached_tokens = best_hit;
  best->inflight_prefill_tokens += tokens;
  best->watchers.insert(watcher);
  return lease;
}

void WorkerPool::PrefillEnded(const WorkerLease& lease, WorkerWatcher* watcher) {
  absl::MutexLock lock(&mu_);
  if (Entry* e = FindLocked(lease)) {
    e->inflight_prefill_tokens -= lease.tokens;
    e->watchers.erase(watcher);
  }
}

void WorkerPool::TakeWatchers(Entry& entry, const std::string& reason,
                              std::vector<std::pair<WorkerWatcher*, std::string>>* lost) {
  for (WorkerWatcher* w : entry.watchers) {
    // Registered watchers are alive (they leave the set before they may be destroyed); pin them
    // for the notification, which runs without the pool lock.
    w->Retain();
    lost->emplace_back(w, reason);
  }
  entry.watchers.clear();
}

void WorkerPool::NotifyLost(std::vector<std::pair<WorkerWatcher*, std::string>>& lost) {
  for (auto& [w, reason] : lost) {
    w->WorkerLost(reason);
    w->Release();
  }
}

std::vector<WorkerView> WorkerPool::ViewsLocked() const {
  std::vector<WorkerView> views;
  views.reserve(entries_.size());
  for (const auto& [key, e] : entries_) {
    WorkerView v;
    v.info = e->info;
    v.load = e->load;
    v.up = e->up;
    v.draining = e->draining;
    v.is_static = e->is_static;
    views.push_back(std::move(v));
  }
  return views;
}

std::vector<WorkerView> WorkerPool::Views() const {
  absl::MutexLock lock(&mu_);
  return ViewsLocked();
}

bool WorkerPool::AwaitViews(const std::function<bool(const std::vector<WorkerView>&)>& pred,
                            std::chrono::milliseconds timeout) const {
  absl::MutexLock lock(&mu_);
  auto holds = [this, &pred]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return pred(ViewsLocked()); };
  return mu_.AwaitWithTimeout(absl::Condition(&holds), absl::FromChrono(timeout));
}

}  // namespace tandem
