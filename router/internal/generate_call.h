// One Generate call, as a short pipeline of stages (DESIGN §2): prepare (validate, tokenize) →
// admit (bounded FIFO) → pick workers and dispatch (Decode, then Prefill on the landing ticket,
// or a local prefill) → stream back (tokens in index order, incremental text, stop strings).
// A failed attempt is re-admitted with the tokens already sent; the client stream goes on.
//
// Callback API only: this object is the server reactor, and its attempts' Decode and Prefill
// calls are client reactors/callbacks. All state sits behind mu_; handlers decide under the lock
// and act on gRPC (start/cancel calls, writes) after releasing it, because gRPC may run another
// reaction inline. The object is reference counted and lives until the server call and every
// worker call it started are done.
#pragma once

#include <grpcpp/alarm.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "engine/text_stream.h"
#include "router/internal/admission.h"
#include "router/internal/prepare.h"
#include "router/internal/request_timing.h"
#include "router/internal/router_core.h"
#include "tandem/internal/v1/worker.grpc.pb.h"
#include "tandem/v1/tandem.grpc.pb.h"

namespace tandem {

class GenerateCall final : public grpc::ServerWriteReactor<v1::GenerateResponse>,
                           public AdmissionQueue::Waiter {
 public:
  // The Tandem.Generate handler.
  static grpc::ServerWriteReactor<v1::GenerateResponse>* Start(RouterCore* core,
                                                               grpc::CallbackServerContext* context,
                                                               const v1::GenerateRequest* request);

  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;
  void Admitted() override;

  // Ends the call with UNAVAILABLE `reason` and cancels its worker calls (router shutdown).
  void Abort(const std::string& reason);

  // A reference keeps the object alive; TryRef fails once the count reached zero.
  void Ref() { refs_.fetch_add(1, std::memory_order_relaxed); }
  bool TryRef();
  void Unref();

 private:
  class DecodeCall;
  class PrefillCall;
  struct Attempt;
  struct Actions;
  enum class Blame { kNone, kDecode, kPrefill };
  enum class Phase { kPreparing, kQueued, kRunning };

  GenerateCall(RouterCore* core, grpc::CallbackServerContext* context);
  ~GenerateCall() override;

  void Begin(const v1::GenerateRequest& request);
  void RunActions(Actions& a);

  // Stages and events; all with mu_ held, gRPC work recorded in `a`.
  void Dispatch(Actions* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool StartPrefill(Attempt* at, const internal::v1::LandingTicket& ticket, Actions* a)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void HandleDecodeMessage(Attempt* at, Actions* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void HandleToken(Attempt* at, const internal::v1::GeneratedToken& token, bool from_prefill,
                   Actions* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Accept(const internal::v1::GeneratedToken& token, bool from_prefill, Actions* a)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DrainReorderBuffer(Attempt* at, Actions* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FailAttempt(Attempt* at, const std::string& reason, grpc::StatusCode code, Blame blame,
                   Actions* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CancelCalls(Attempt* at, Actions* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Decides the outcome (once): OK with `finish_reason`, or an error status.
  // Counts the outcome and the request-level latencies (router metrics, when configured).
  void RecordOutcome(const grpc::Status& status, const std::string& finish_reason)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Conclude(const grpc::Status& status, const std::string& finish_reason, bool cancel_workers,
                Actions* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MaybeWrite(Actions* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SetDeadline(grpc::ClientContext* context) const;
  grpc::Status DeadlineExceeded() const;

  void OnDecodeRead(Attempt* at, bool ok);
  void OnDecodeDone(Attempt* at, const grpc::Status& status);
  void OnPrefillDone(Attempt* at, const grpc::Status& status);
  void OnWorkerLost(Attempt* at, Blame blame, const std::string& reason);
  void OnAlarm(bool fired);

  RouterCore* const core_;
  grpc::CallbackServerContext* const context_;
  std::atomic<int> refs_{1};  // the server call's
  grpc::Alarm alarm_;         // request_timeout

  // Fixed once Begin() is past validation (but req_.block_hashes, filled on first use under mu_).
  PreparedRequest req_;
  std::string request_id_;
  // Worker calls' deadline: the client's, or request_timeout after arrival when sooner.
  std::chrono::system_clock::time_point deadline_ = std::chrono::system_clock::time_point::max();
  std::chrono::system_clock::time_point timeout_at_;  // request_timeout (the alarm)

  absl::Mutex mu_;
  Phase phase_ ABSL_GUARDED_BY(mu_) = Phase::kPreparing;
  bool slot_held_ ABSL_GUARDED_BY(mu_) = false;
  bool alarm_set_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;    // the client is gone
  bool concluded_ ABSL_GUARDED_BY(mu_) = false;    // outcome decided
  bool natural_end_ ABSL_GUARDED_BY(mu_) = false;  // concluded by the decode stream's own finish
  grpc::Status final_status_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<Attempt>> attempts_ ABSL_GUARDED_BY(mu_);
  Attempt* current_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::vector<std::string> failed_decode_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> failed_prefill_ ABSL_GUARDED_BY(mu_);
  std::string last_failure_ ABSL_GUARDED_BY(mu_);

  // Stream back: tokens accepted in index order (what re-admission sends as output_ids), later
  // indices waiting for earlier ones, and the client's text.
  std::vector<int32_t> output_ids_ ABSL_GUARDED_BY(mu_);
  std::vector<internal::v1::GeneratedToken> reorder_ ABSL_GUARDED_BY(mu_);
  std::optional<TextStream> text_ ABSL_GUARDED_BY(mu_);
  int32_t cached_tokens_ ABSL_GUARDED_BY(mu_) = 0;

  // One write in flight: `writing_` belongs to gRPC until OnWriteDone; `pending_` collects what
  // comes meanwhile (several tokens coalesce into one message).
  v1::GenerateResponse pending_ ABSL_GUARDED_BY(mu_);
  v1::GenerateResponse writing_;
  bool pending_has_content_ ABSL_GUARDED_BY(mu_) = false;
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_sent_ ABSL_GUARDED_BY(mu_) = false;

  RequestTiming timing_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tandem
