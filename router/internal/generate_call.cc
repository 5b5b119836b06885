// One Generate call: see generate_call.h.
#include "router/internal/generate_call.h"

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>

#include "server/common/metrics.h"

#include <algorithm>
#include <array>
#include <cstdlib>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "proto/convert.h"

namespace tandem {
namespace {
double Seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}
}  // namespace

using internal::v1::GeneratedToken;

namespace {

// How far ahead of the next expected index a worker may send a token (they arrive at most a
// few apart: the decode stream racing the Prefill response).
constexpr int64_t kMaxReorderWindow = 64;
constexpr size_t kMaxWorkerMessageInStatus = 200;

std::string CodeName(grpc::StatusCode code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

}  // namespace

// gRPC work decided under mu_ and carried out after it is released, in this order.
struct GenerateCall::Actions {
  std::array<grpc::ClientContext*, 4> cancel{};
  int num_cancel = 0;
  bool cancel_alarm = false;
  bool dequeue = false;
  bool release_slot = false;
  DecodeCall* start_decode = nullptr;  // on decode_endpoint
  WorkerEndpoint* decode_endpoint = nullptr;
  PrefillCall* start_prefill = nullptr;  // on prefill_endpoint
  WorkerEndpoint* prefill_endpoint = nullptr;
  DecodeCall* read_decode = nullptr;
  const v1::GenerateResponse* write = nullptr;
  bool write_is_last = false;  // StartWriteAndFinish(write, status)
  bool finish = false;         // Finish(status)
  grpc::Status status;
  bool cancel_server = false;

  void Cancel(grpc::ClientContext* context) {
    // At most two calls per attempt, and one handler touches at most two attempts (the failed
    // one and nothing else: a new attempt has nothing to cancel yet).
    if (num_cancel == static_cast<int>(cancel.size())) {
      std::abort();
    }
    cancel[num_cancel++] = context;
  }
};

class GenerateCall::DecodeCall final : public grpc::ClientReadReactor<internal::v1::DecodeResponse>,
                                       public WorkerWatcher {
 public:
  DecodeCall(GenerateCall* owner, Attempt* attempt) : owner_(owner), attempt_(attempt) {}
  void OnReadDone(bool ok) override { owner_->OnDecodeRead(attempt_, ok); }
  void OnDone(const grpc::Status& s) override { owner_->OnDecodeDone(attempt_, s); }
  void Retain() override { owner_->Ref(); }
  void Release() override { owner_->Unref(); }
  void WorkerLost(const std::string& reason) override {
    owner_->OnWorkerLost(attempt_, Blame::kDecode, reason);
  }

  grpc::ClientContext context;
  internal::v1::DecodeRequest request;
  internal::v1::DecodeResponse response;
  bool done = false;         // OnDone ran (guarded by the owner's mu_)
  bool cancel_sent = false;  // (guarded by the owner's mu_)

 private:
  GenerateCall* const owner_;
  Attempt* const attempt_;
};

class GenerateCall::PrefillCall final : public WorkerWatcher {
 public:
  PrefillCall(GenerateCall* owner, Attempt* attempt) : owner_(owner), attempt_(attempt) {}
  void Retain() override { owner_->Ref(); }
  void Release() override { owner_->Unref(); }
  void WorkerLost(const std::string& reason) override {
    owner_->OnWorkerLost(attempt_, Blame::kPrefill, reason);
  }
  void Done(const grpc::Status& s) { owner_->OnPrefillDone(attempt_, s); }

  grpc::ClientContext context;
  internal::v1::PrefillRequest request;
  internal::v1::PrefillResponse response;
  bool started = false;  // (guarded by the owner's mu_)
  bool done = false;
  bool cancel_sent = false;

 private:
  GenerateCall* const owner_;
  Attempt* const attempt_;
};

// One dispatch of the request: a Decode call and, on a landing ticket, a Prefill call.
struct GenerateCall::Attempt {
  Attempt(GenerateCall* owner, int n) : number(n), decode(owner, this), prefill(owner, this) {}

  const int number;
  int32_t first_index = 0;  // output index of the first token this attempt produces
  bool local_prefill_requested = false;
  bool answered = false;  // the decode worker's first message arrived
  bool local = false;     // the decode worker computes the prompt itself
  bool failed = false;
  WorkerLease decode_lease;
  std::optional<WorkerLease> prefill_lease;
  DecodeCall decode;
  PrefillCall prefill;
};

grpc::ServerWriteReactor<v1::GenerateResponse>* GenerateCall::Start(
    RouterCore* core, grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  auto* call = new GenerateCall(core, context);
  call->Begin(*request);
  return call;
}

GenerateCall::GenerateCall(RouterCore* core, grpc::CallbackServerContext* context)
    : core_(core), context_(context) {
  absl::MutexLock lock(&core_->mu);
  ++core_->in_flight;
  core_->calls.insert(this);
}

GenerateCall::~GenerateCall() {
  // The attempts hold worker channels: they go before the router may be destroyed (it waits
  // for `calls` to empty), never after.
  {
    absl::MutexLock lock(&mu_);
    attempts_.clear();
  }
  absl::MutexLock lock(&core_->mu);
  core_->calls.erase(this);
}

bool GenerateCall::TryRef() {
  int n = refs_.load(std::memory_order_relaxed);
  while (n > 0) {
    if (refs_.compare_exchange_weak(n, n + 1, std::memory_order_relaxed)) {
      return true;
    }
  }
  return false;
}

void GenerateCall::Unref() {
  if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    delete this;
  }
}

void GenerateCall::Begin(const v1::GenerateRequest& request) {
  Actions a;
  bool admit = false;
  {
    absl::MutexLock lock(&mu_);
    timing_.arrival = RequestTiming::Clock::now();
    request_id_ = request.request_id();
    if (concluded_) {
      // Aborted (router shutdown) before it even started.
    } else if (core_->shutting_down.load()) {
      Conclude(grpc::Status(grpc::StatusCode::UNAVAILABLE, "router shutting down"), "", false, &a);
    } else if (core_->draining.load()) {
      Conclude(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                            "draining: this router takes no new requests"),
               "", false, &a);
    } else if (auto prepared = PrepareGenerate(request, core_->model); !prepared.ok()) {
      Conclude(ToGrpcStatus(prepared.status()), "", false, &a);
    } else {
      req_ = *std::move(prepared);
      if (core_->model.tokenizer != nullptr) {
        text_.emplace(*core_->model.tokenizer, req_.prompt_ids, req_.stop);
      }
      deadline_ = context_->deadline();
      if (core_->options.request_timeout.count() > 0) {
        timeout_at_ = std::chrono::system_clock::now() + core_->options.request_timeout;
        deadline_ = std::min(deadline_, timeout_at_);
      }
      phase_ = Phase::kQueued;
      admit = true;
    }
  }
  RunActions(a);
  if (!admit) {
    return;
  }
  Ref();  // the admission queue's, until Admitted() or Remove()
  switch (core_->admission.Enter(this)) {
    case AdmissionQueue::Entry::kQueued:
      break;
    case AdmissionQueue::Entry::kAdmitted:
      Admitted();  // consumes the reference taken for the queue
      break;
    case AdmissionQueue::Entry::kRejected: {
      Unref();
      context_->AddTrailingMetadata("grpc-retry-pushback-ms", "100");
      Actions r;
      {
        absl::MutexLock lock(&mu_);
        Conclude(grpc::Status(
                     grpc::StatusCode::RESOURCE_EXHAUSTED,
                     absl::StrCat("router overloaded: ", core_->options.max_running,
                                  " requests running and ", core_->options.max_queued, " queued")),
                 "", false, &r);
      }
      RunActions(r);
      return;
    }
  }
  if (core_->options.request_timeout.count() > 0) {
    // Set without mu_ (its callback takes mu_). Whoever sees it armed cancels it: Conclude
    // once alarm_set_ is true, this code if the call ended meanwhile.
    Ref();  // the alarm's, until its callback
    alarm_.Set(timeout_at_, [this](bool fired) { OnAlarm(fired); });
    bool ended = false;
    {
      absl::MutexLock lock(&mu_);
      ended = concluded_;
      alarm_set_ = !ended;
    }
    if (ended) {
      alarm_.Cancel();
    }
  }
}

void GenerateCall::Admitted() {
  Actions a;
  {
    absl::MutexLock lock(&mu_);
    phase_ = Phase::kRunning;
    if (concluded_) {
      a.release_slot = true;  // cancelled or timed out while it waited: pass the slot on
    } else {
      slot_held_ = true;
      timing_.dispatch = RequestTiming::Clock::now();
      if (RouterMetrics* m = core_->options.metrics) {
        m->queue_time().Observe(Seconds(timing_.queue_time()));
        m->prompt_tokens().Increment(static_cast<double>(req_.prompt_ids.size()));
      }
      Dispatch(&a);
    }
  }
  RunActions(a);
  Unref();  // the admission queue's
}

grpc::Status GenerateCall::DeadlineExceeded() const {
  if (timeout_at_ != std::chrono::system_clock::time_point{} && timeout_at_ <= deadline_) {
    return grpc::Status(
        grpc::StatusCode::DEADLINE_EXCEEDED,
        absl::StrCat("request timed out after ", core_->options.request_timeout.count(), " ms"));
  }
  return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "deadline exceeded");
}

void GenerateCall::SetDeadline(grpc::ClientContext* context) const {
  if (deadline_ != std::chrono::system_clock::time_point::max()) {
    context->set_deadline(deadline_);
  }
}

void GenerateCall::Dispatch(Actions* a) {
  const int number = static_cast<int>(attempts_.size()) + 1;
  auto at = std::make_unique<Attempt>(this, number);
  at->first_index = static_cast<int32_t>(output_ids_.size());
  at->local_prefill_requested =
      !core_->options.disaggregated || !core_->pool.HasPrefill(failed_prefill_);
  const int64_t tokens = static_cast<int64_t>(req_.prompt_ids.size()) + req_.max_tokens;
  std::optional<WorkerLease> lease = core_->pool.PickDecode(tokens, failed_decode_, &at->decode);
  if (!lease) {
    Conclude(
        grpc::Status(grpc::StatusCode::UNAVAILABLE,
                     attempts_.empty() ? std::string("no decode worker available")
                                       : absl::StrCat("request failed after ", attempts_.size(),
                                                      " attempts: ", last_failure_,
                                                      "; no decode worker available")),
        "", true, a);
    return;
  }
  at->decode_lease = *std::move(lease);
  internal::v1::DecodeRequest& dr = at->decode.request;
  internal::v1::SequenceSpec* seq = dr.mutable_seq();
  seq->set_request_id(request_id_);
  seq->mutable_prompt_ids()->Assign(req_.prompt_ids.begin(), req_.prompt_ids.end());
  seq->mutable_output_ids()->Assign(output_ids_.begin(), output_ids_.end());
  *seq->mutable_sampling() = req_.sampling;
  dr.set_local_prefill(at->local_prefill_requested);
  SetDeadline(&at->decode.context);
  Ref();  // the Decode call's, until its OnDone
  timing_.attempts = number;
  reorder_.clear();
  current_ = at.get();
  attempts_.push_back(std::move(at));
  a->start_decode = &current_->decode;
  a->decode_endpoint = current_->decode_lease.endpoint.get();
}

bool GenerateCall::StartPrefill(Attempt* at, const internal::v1::LandingTicket& ticket,
                                Actions* a) {
  if (req_.block_hashes.empty()) {
    req_.block_hashes =
        HashFullBlocks(req_.prompt_ids, kAffinityBlockTokens, core_->model.fingerprint);
  }
  const int64_t tokens = static_cast<int64_t>(req_.prompt_ids.size()) + at->first_index;
  std::optional<WorkerLease> lease =
      core_->pool.PickPrefill(req_.block_hashes, tokens, failed_prefill_, &at->prefill);
  if (!lease) {
    return false;
  }
  at->prefill_lease = std::move(lease);
  internal::v1::PrefillRequest& pr = at->prefill.request;
  *pr.mutable_seq() = at->decode.request.seq();
  *pr.mutable_ticket() = ticket;
  SetDeadline(&at->prefill.context);
  at->prefill.started = true;
  Ref();  // the Prefill call's, until its callback
  a->start_prefill = &at->prefill;
  a->prefill_endpoint = at->prefill_lease->endpoint.get();
  return true;
}

void GenerateCall::OnDecodeRead(Attempt* at, bool ok) {
  if (!ok) {
    return;  // the stream ended; OnDone follows
  }
  Actions a;
  {
    absl::MutexLock lock(&mu_);
    HandleDecodeMessage(at, &a);
  }
  RunActions(a);
}

void GenerateCall::HandleDecodeMessage(Attempt* at, Actions* a) {
  const internal::v1::DecodeResponse& msg = at->decode.response;
  const std::string& worker = at->decode_lease.key;
  if (at != current_ || at->failed || concluded_) {
    // Nothing more is wanted from this stream (a finished one should not send more either).
    if (!at->decode.cancel_sent) {
      at->decode.cancel_sent = true;
      a->Cancel(&at->decode.context);
    }
    return;
  }
  if (!at->answered) {
    at->answered = true;
    core_->pool.DecodeAcknowledged(&at->decode_lease);
    if (msg.start_case() == internal::v1::DecodeResponse::kTicket) {
      if (at->local_prefill_requested) {
        FailAttempt(at,
                    absl::StrCat("decode worker ", worker,
                                 " sent a landing ticket for a local-prefill request"),
                    grpc::StatusCode::UNAVAILABLE, Blame::kDecode, a);
        return;
      }
      if (msg.ticket().model_fingerprint() != core_->model.fingerprint) {
        FailAttempt(
            at,
            absl::StrCat("decode worker ", worker, " issued a landing ticket for another model"),
            grpc::StatusCode::UNAVAILABLE, Blame::kDecode, a);
        return;
      }
      if (!StartPrefill(at, msg.ticket(), a)) {
        // The next attempt prefills locally (HasPrefill is false now).
        FailAttempt(at, "no prefill worker available for the landing ticket",
                    grpc::StatusCode::UNAVAILABLE, Blame::kNone, a);
        return;
      }
    } else if (msg.start_case() == internal::v1::DecodeResponse::kLocalPrefill &&
               msg.local_prefill()) {
      at->local = true;
      cached_tokens_ = msg.cached_tokens();
    } else {
      FailAttempt(at,
                  absl::StrCat("decode worker ", worker,
                               " answered without a landing ticket or local prefill"),
                  grpc::StatusCode::UNAVAILABLE, Blame::kDecode, a);
      return;
    }
  }
  for (const GeneratedToken& token : msg.tokens()) {
    HandleToken(at, token, /*from_prefill=*/false, a);
    if (at->failed || concluded_) {
      break;
    }
  }
  if (at->failed) {
    return;
  }
  if (!concluded_ || natural_end_) {
    // After its finish token the worker ends the stream: read on to see it close cleanly.
    a->read_decode = &at->decode;
  }
}

void GenerateCall::HandleToken(Attempt* at, const GeneratedToken& token, bool from_prefill,
                               Actions* a) {
  const Blame blame = from_prefill ? Blame::kPrefill : Blame::kDecode;
  auto who = [&] {
    return from_prefill ? absl::StrCat("prefill worker ", at->prefill_lease->key)
                        : absl::StrCat("decode worker ", at->decode_lease.key);
  };
  const std::string& finish = token.finish_reason();
  if (!finish.empty() && finish != "stop" && finish != "length") {
    FailAttempt(at, absl::StrCat(who(), " aborted the sequence"), grpc::StatusCode::UNAVAILABLE,
                blame, a);
    return;
  }
  if (token.index() < 0 || token.id() < 0 || token.id() >= core_->model.vocab_size()) {
    FailAttempt(at, absl::StrCat(who(), " sent an invalid token"), grpc::StatusCode::UNAVAILABLE,
                blame, a);
    return;
  }
  const int64_t next = static_cast<int64_t>(output_ids_.size());
  if (token.index() < next) {
    return;  // sent already
  }
  if (!from_prefill && !at->local && token.index() == at->first_index) {
    return;  // the Prefill response's copy of the first token is the authoritative one
  }
  if (token.index() == next) {
    Accept(token, from_prefill, a);
    DrainReorderBuffer(at, a);
    return;
  }
  if (token.index() >= req_.max_tokens || token.index() - next > kMaxReorderWindow) {
    FailAttempt(
        at,
        absl::StrCat(who(), " sent token index ", token.index(), " while ", next, " was expected"),
        grpc::StatusCode::UNAVAILABLE, blame, a);
    return;
  }
  for (const GeneratedToken& t : reorder_) {
    if (t.index() == token.index()) {
      return;
    }
  }
  reorder_.push_back(token);
}

void GenerateCall::DrainReorderBuffer(Attempt* at, Actions* a) {
  while (!concluded_ && !at->failed && !reorder_.empty()) {
    const int64_t next = static_cast<int64_t>(output_ids_.size());
    auto it = std::find_if(reorder_.begin(), reorder_.end(),
                           [next](const GeneratedToken& t) { return t.index() == next; });
    if (it == reorder_.end()) {
      return;
    }
    GeneratedToken token = std::move(*it);
    reorder_.erase(it);
    Accept(token, /*from_prefill=*/false, a);
  }
}

void GenerateCall::Accept(const GeneratedToken& token, bool from_prefill, Actions* a) {
  output_ids_.push_back(token.id());
  const auto gap = timing_.MarkToken(RequestTiming::Clock::now());
  if (RouterMetrics* m = core_->options.metrics) {
    if (timing_.tokens == 1) {
      m->ttft().Observe(Seconds(timing_.time_to_first_token()));
    } else {
      m->inter_token().Observe(Seconds(gap));
    }
    m->generation_tokens().Increment();
  }
  pending_.add_token_ids(token.id());
  if (req_.logprobs >= 0) {
    v1::TokenLogprobs* lp = pending_.add_logprobs();
    lp->set_logprob(token.logprob());
    const int n = std::min(req_.logprobs, token.top_size());
    for (int i = 0; i < n; ++i) {
      *lp->add_top() = token.top(i);
    }
  }
  pending_has_content_ = true;
  bool stopped = false;
  if (text_) {
    pending_.mutable_text()->append(text_->Push(token.id(), &stopped));
  }
  if (stopped) {
    Conclude(grpc::Status::OK, "stop", /*cancel_workers=*/true, a);
    return;
  }
  if (!token.finish_reason().empty()) {
    if (text_) {
      pending_.mutable_text()->append(text_->Finish(token.finish_reason() == "length"));
    }
    // The decode stream ends by itself after its finish token; a finish carried by the Prefill
    // response may still find the decode worker going.
    natural_end_ = !from_prefill;
    Conclude(grpc::Status::OK, token.finish_reason(), /*cancel_workers=*/from_prefill, a);
    return;
  }
  const int64_t total = static_cast<int64_t>(req_.prompt_ids.size() + output_ids_.size());
  if (static_cast<int64_t>(output_ids_.size()) >= req_.max_tokens ||
      total >= core_->model.max_model_len()) {
    // The worker should have said so; the router holds the limit anyway.
    if (text_) {
      pending_.mutable_text()->append(text_->Finish(true));
    }
    Conclude(grpc::Status::OK, "length", /*cancel_workers=*/true, a);
    return;
  }
  MaybeWrite(a);
}

void GenerateCall::OnDecodeDone(Attempt* at, const grpc::Status& status) {
  Actions a;
  {
    absl::MutexLock lock(&mu_);
    at->decode.done = true;
    core_->pool.DecodeEnded(at->decode_lease, &at->decode);
    if (at == current_ && !at->failed && !concluded_) {
      const std::string& worker = at->decode_lease.key;
      if (!status.ok()) {
        FailAttempt(at,
                    status.error_code() == grpc::StatusCode::INVALID_ARGUMENT
                        ? absl::StrCat("decode worker ", worker, ": ",
                                       status.error_message().substr(0, kMaxWorkerMessageInStatus))
                        : absl::StrCat("decode worker ", worker, " failed (",
                                       CodeName(status.error_code()), ")"),
                    status.error_code(), Blame::kDecode, &a);
      } else if (at->local || at->prefill.done) {
        FailAttempt(at, absl::StrCat("decode worker ", worker, " ended the stream early"),
                    grpc::StatusCode::UNAVAILABLE, Blame::kDecode, &a);
      }
      // Otherwise the Prefill response is still to come and decides.
    }
  }
  RunActions(a);
  Unref();  // the Decode call's
}

void GenerateCall::OnPrefillDone(Attempt* at, const grpc::Status& status) {
  Actions a;
  {
    absl::MutexLock lock(&mu_);
    at->prefill.done = true;
    core_->pool.PrefillEnded(*at->prefill_lease, &at->prefill);
    if (at == current_ && !at->failed && !concluded_) {
      const std::string& worker = at->prefill_lease->key;
      const GeneratedToken& first = at->prefill.response.first();
      if (!status.ok()) {
        FailAttempt(at,
                    status.error_code() == grpc::StatusCode::INVALID_ARGUMENT
                        ? absl::StrCat("prefill worker ", worker, ": ",
                                       status.error_message().substr(0, kMaxWorkerMessageInStatus))
                        : absl::StrCat("prefill worker ", worker, " failed (",
                                       CodeName(status.error_code()), ")"),
                    status.error_code(), Blame::kPrefill, &a);
      } else if (first.index() != at->first_index) {
        FailAttempt(at,
                    absl::StrCat("prefill worker ", worker, " returned token index ", first.index(),
                                 ", expected ", at->first_index),
                    grpc::StatusCode::UNAVAILABLE, Blame::kPrefill, &a);
      } else {
        cached_tokens_ = at->prefill.response.cached_tokens();
        HandleToken(at, first, /*from_prefill=*/true, &a);
        if (!at->failed && !concluded_ && at->decode.done) {
          FailAttempt(
              at, absl::StrCat("decode worker ", at->decode_lease.key, " ended the stream early"),
              grpc::StatusCode::UNAVAILABLE, Blame::kDecode, &a);
        }
      }
    }
  }
  RunActions(a);
  Unref();  // the Prefill call's
}

void GenerateCall::OnWorkerLost(Attempt* at, Blame blame, const std::string& reason) {
  Actions a;
  {
    absl::MutexLock lock(&mu_);
    if (at == current_ && !at->failed && !concluded_) {
      FailAttempt(at, reason, grpc::StatusCode::UNAVAILABLE, blame, &a);
    }
  }
  RunActions(a);
}

void GenerateCall::FailAttempt(Attempt* at, const std::string& reason, grpc::StatusCode code,
                               Blame blame, Actions* a) {
  at->failed = true;
  CancelCalls(at, a);
  reorder_.clear();
  last_failure_ = reason;
  auto remember = [](std::vector<std::string>& v, const std::string& key) {
    if (std::find(v.begin(), v.end(), key) == v.end()) {
      v.push_back(key);
    }
  };
  if (blame == Blame::kDecode) {
    remember(failed_decode_, at->decode_lease.key);
  } else if (blame == Blame::kPrefill && at->prefill_lease) {
    remember(failed_prefill_, at->prefill_lease->key);
  }
  if (code == grpc::StatusCode::INVALID_ARGUMENT) {
    // Another worker would refuse it too.
    Conclude(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("request refused as invalid by ", reason)),
             "", true, a);
  } else if (std::chrono::system_clock::now() >= deadline_) {
    Conclude(DeadlineExceeded(), "", true, a);
  } else if (static_cast<int>(attempts_.size()) >= core_->options.max_attempts) {
    Conclude(grpc::Status(
                 grpc::StatusCode::UNAVAILABLE,
                 absl::StrCat("request failed after ", attempts_.size(), " attempts: ", reason)),
             "", true, a);
  } else {
    if (RouterMetrics* m = core_->options.metrics) {
      m->readmissions().Increment();
    }
    Dispatch(a);  // re-admission: output_ids = everything accepted so far
  }
}

void GenerateCall::CancelCalls(Attempt* at, Actions* a) {
  if (!at->decode.done && !at->decode.cancel_sent) {
    at->decode.cancel_sent = true;
    a->Cancel(&at->decode.context);
  }
  if (at->prefill.started && !at->prefill.done && !at->prefill.cancel_sent) {
    at->prefill.cancel_sent = true;
    a->Cancel(&at->prefill.context);
  }
}

void GenerateCall::Conclude(const grpc::Status& status, const std::string& finish_reason,
                            bool cancel_workers, Actions* a) {
  if (concluded_) {
    return;
  }
  concluded_ = true;
  final_status_ = status;
  timing_.end = RequestTiming::Clock::now();
  RecordOutcome(status, finish_reason);
  if (status.ok()) {
    pending_.set_finish_reason(finish_reason);
    v1::Usage* usage = pending_.mutable_usage();
    usage->set_prompt_tokens(static_cast<int32_t>(req_.prompt_ids.size()));
    usage->set_completion_tokens(static_cast<int32_t>(output_ids_.size()));
    usage->set_cached_prompt_tokens(cached_tokens_);
    pending_has_content_ = true;
  }
  if (cancel_workers && current_ != nullptr) {
    CancelCalls(current_, a);
  }
  if (phase_ == Phase::kQueued) {
    a->dequeue = true;
  }
  if (slot_held_) {
    slot_held_ = false;
    a->release_slot = true;
  }
  if (alarm_set_) {
    alarm_set_ = false;
    a->cancel_alarm = true;
  }
  MaybeWrite(a);
}

void GenerateCall::RecordOutcome(const grpc::Status& status, const std::string& finish_reason) {
  RouterMetrics* m = core_->options.metrics;
  if (m == nullptr) {
    return;
  }
  RequestOutcome outcome = RequestOutcome::kInternal;
  switch (status.error_code()) {
    case grpc::StatusCode::OK:
      outcome = RequestOutcome::kSuccess;
      break;
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::OUT_OF_RANGE:
    case grpc::StatusCode::NOT_FOUND:
      outcome = RequestOutcome::kInvalidArgument;
      break;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      outcome = RequestOutcome::kResourceExhausted;
      break;
    case grpc::StatusCode::UNAVAILABLE:
      outcome = RequestOutcome::kUnavailable;
      break;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      outcome = RequestOutcome::kDeadlineExceeded;
      break;
    case grpc::StatusCode::CANCELLED:
      outcome = RequestOutcome::kCancelled;
      break;
    default:
      break;
  }
  m->outcome(outcome).Increment();
  if (!status.ok()) {
    return;
  }
  m->finished(finish_reason == "stop"     ? FinishReason::kStop
              : finish_reason == "length" ? FinishReason::kLength
                                          : FinishReason::kAbort)
      .Increment();
  m->e2e().Observe(Seconds(timing_.end_to_end()));
  if (timing_.tokens > 1) {
    m->time_per_output_token().Observe(Seconds(timing_.last_token - timing_.first_token) /
                                       static_cast<double>(timing_.tokens - 1));
  }
}

void GenerateCall::MaybeWrite(Actions* a) {
  if (write_in_flight_ || finish_sent_) {
    return;
  }
  if (cancelled_) {
    if (concluded_) {
      finish_sent_ = true;
      a->finish = true;
      a->status = final_status_;
    }
    return;
  }
  if (pending_has_content_) {
    writing_.Swap(&pending_);
    pending_.Clear();
    pending_has_content_ = false;
    if (!request_id_.empty()) {
      writing_.set_request_id(request_id_);
    }
    a->write = &writing_;
    if (concluded_ && final_status_.ok()) {
      finish_sent_ = true;
      a->write_is_last = true;
      a->status = grpc::Status::OK;
    } else {
      write_in_flight_ = true;
    }
    return;
  }
  if (concluded_) {
    finish_sent_ = true;
    a->finish = true;
    a->status = final_status_;
  }
}

void GenerateCall::RunActions(Actions& a) {
  for (int i = 0; i < a.num_cancel; ++i) {
    a.cancel[i]->TryCancel();
  }
  if (a.cancel_alarm) {
    alarm_.Cancel();
  }
  if (a.dequeue && core_->admission.Remove(this)) {
    Unref();  // the admission queue's; never the last (the caller holds one)
  }
  if (a.release_slot) {
    core_->admission.Release();
  }
  if (DecodeCall* d = a.start_decode) {
    a.decode_endpoint->decode->async()->Decode(&d->context, &d->request, d);
    d->StartRead(&d->response);
    d->StartCall();
  }
  if (PrefillCall* p = a.start_prefill) {
    a.prefill_endpoint->prefill->async()->Prefill(&p->context, &p->request, &p->response,
                                                  [p](grpc::Status s) { p->Done(s); });
  }
  if (a.read_decode != nullptr) {
    a.read_decode->StartRead(&a.read_decode->response);
  }
  if (a.write_is_last) {
    StartWriteAndFinish(a.write, grpc::WriteOptions(), a.status);
  } else if (a.write != nullptr) {
    StartWrite(a.write);
  } else if (a.finish) {
    Finish(a.status);
  }
  if (a.cancel_server) {
    context_->TryCancel();
  }
}

void GenerateCall::OnWriteDone(bool ok) {
  Actions a;
  {
    absl::MutexLock lock(&mu_);
    write_in_flight_ = false;
    if (!ok) {
      cancelled_ = true;
      Conclude(grpc::Status(grpc::StatusCode::CANCELLED, "client stream closed"), "", true, &a);
    }
    MaybeWrite(&a);
  }
  RunActions(a);
}

void GenerateCall::OnCancel() {
  Actions a;
  {
    absl::MutexLock lock(&mu_);
    cancelled_ = true;
    Conclude(grpc::Status(grpc::StatusCode::CANCELLED, "client cancelled"), "", true, &a);
    MaybeWrite(&a);
  }
  RunActions(a);
}

void GenerateCall::OnAlarm(bool fired) {
  if (fired) {
    Actions a;
    {
      absl::MutexLock lock(&mu_);
      alarm_set_ = false;
      Conclude(DeadlineExceeded(), "", true, &a);
    }
    RunActions(a);
  }
  Unref();  // the alarm's
}

void GenerateCall::Abort(const std::string& reason) {
  Actions a;
  {
    absl::MutexLock lock(&mu_);
    // A write the client never reads would hold the call open: cancel the call itself then.
    a.cancel_server = write_in_flight_;
    Conclude(grpc::Status(grpc::StatusCode::UNAVAILABLE, reason), "", true, &a);
  }
  RunActions(a);
}

void GenerateCall::OnDone() {
  {
    absl::MutexLock lock(&core_->mu);
    --core_->in_flight;
  }
  Unref();  // the server call's
}

}  // namespace tandem
