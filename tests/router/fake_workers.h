// Fake prefill and decode workers for router tests: in-process gRPC servers on 127.0.0.1:0
// serving Worker, DecodeWorker and PrefillWorker with scripted behaviour (tokens from a
// deterministic function of the prompt, failures after k tokens, rejections, hangs, gates), and
// recording what they were asked and whether the router cancelled them. Callback API, so a
// fake notices a cancellation the moment it happens.
#pragma once

#include <grpcpp/alarm.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "tandem/internal/v1/worker.grpc.pb.h"

namespace tandem::testing {

using internal::v1::DecodeRequest;
using internal::v1::DecodeResponse;
using internal::v1::GeneratedToken;
using internal::v1::PrefillRequest;
using internal::v1::PrefillResponse;
using internal::v1::Role;
using internal::v1::WorkerInfo;
using internal::v1::WorkerLoad;

// The tokens every fake generates: output index i of a prompt is ids[(len(prompt) + i) % n],
// so any worker continues any other's sequence identically.
struct TokenScript {
  std::vector<int32_t> ids;
  template <typename Prompt>
  int32_t At(const Prompt& prompt, int64_t index) const {
    return ids[static_cast<size_t>((static_cast<int64_t>(prompt.size()) + index) %
                                   static_cast<int64_t>(ids.size()))];
  }
  template <typename Prompt>
  std::vector<int32_t> Expected(const Prompt& prompt, int n) const {
    std::vector<int32_t> out;
    for (int i = 0; i < n; ++i) out.push_back(At(prompt, i));
    return out;
  }
};

inline float FakeLogprob(int64_t index) { return -0.125f * static_cast<float>(index + 1); }

// Fills a token as every fake produces it (logprob and three top entries are functions of the
// index, so tests can check them).
template <typename Prompt>
void FillToken(const TokenScript& script, const Prompt& prompt, int64_t index, int32_t max_tokens,
               GeneratedToken* t) {
  t->set_index(static_cast<int32_t>(index));
  t->set_id(script.At(prompt, index));
  t->set_logprob(FakeLogprob(index));
  for (int k = 0; k < 3; ++k) {
    auto* top = t->add_top();
    top->set_token_id(script.At(prompt, index + k));
    top->set_logprob(FakeLogprob(index + k));
  }
  if (index + 1 >= max_tokens) t->set_finish_reason("length");
}

// One-shot named events between fakes and tests ("landed/7": the KV of transfer 7 arrived;
// "gate/d1": decode worker d1 may start answering). A callback runs once, without the lock.
class SignalBoard {
 public:
  void Raise(const std::string& key) {
    std::vector<std::function<void()>> run;
    {
      std::lock_guard<std::mutex> l(mu_);
      raised_.insert(key);
      auto it = waiting_.find(key);
      if (it != waiting_.end()) {
        run = std::move(it->second);
        waiting_.erase(it);
      }
    }
    for (auto& cb : run) cb();
  }
  void OnRaised(const std::string& key, std::function<void()> cb) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!raised_.count(key)) {
        waiting_[key].push_back(std::move(cb));
        return;
      }
    }
    cb();
  }
  uint64_t NewTransfer() { return next_transfer_.fetch_add(1); }

 private:
  std::mutex mu_;
  std::set<std::string> raised_;
  std::map<std::string, std::vector<std::function<void()>>> waiting_;
  std::atomic<uint64_t> next_transfer_{1};
};

struct DecodeBehavior {
  int fail_after = -1;  // end the stream with UNAVAILABLE after sending this many tokens
  int hang_after = -1;  // stop after this many tokens and wait to be cancelled
  std::chrono::milliseconds token_delay{0};
  // Ticket mode: the ticket message already carries this many tokens from the first index on,
  // i.e. before any Prefill returned; the copy of the first one has id + first_id_offset.
  int early_tokens = 0;
  int32_t first_id_offset = 0;
  bool force_local = false;  // answer local_prefill even when a ticket was asked for
  grpc::StatusCode reject = grpc::StatusCode::OK;  // fail at once with this code
  bool gated = false;  // answer nothing until the test opens this worker's gate
  int tokens_per_message = 1;
  int32_t cached_tokens = 0;  // local prefill
};

struct PrefillBehavior {
  grpc::StatusCode fail = grpc::StatusCode::OK;
  bool hang = false;  // never answer; wait to be cancelled
  int32_t cached_tokens = 0;
};

class FakeWorker;

class FakeDecodeStream final : public grpc::ServerWriteReactor<DecodeResponse>,
                               public std::enable_shared_from_this<FakeDecodeStream> {
 public:
  static FakeDecodeStream* Start(FakeWorker* worker, const DecodeRequest& request);
  void OnWriteDone(bool ok) override {
    {
      std::lock_guard<std::mutex> l(mu_);
      write_in_flight_ = false;
      if (!ok) broken_ = true;
    }
    Kick();
  }
  void OnCancel() override;
  void OnDone() override;

 private:
  enum class Stage { kStart, kAwaitKv, kTokens };
  enum class Op { kNone, kWrite, kFinish, kAlarm, kCancelAlarm, kAwaitGate, kAwaitKv };

  FakeDecodeStream(FakeWorker* worker, const DecodeRequest& request);
  Op NextOp(grpc::Status* status);
  void Kick();
  void Wake() {
    {
      std::lock_guard<std::mutex> l(mu_);
      waiting_ = false;
    }
    Kick();
  }

  FakeWorker* const worker_;
  const DecodeRequest request_;
  DecodeBehavior b_;
  std::shared_ptr<FakeDecodeStream> self_;  // until OnDone
  grpc::Alarm alarm_;
  DecodeResponse out_;  // owned by gRPC while a write is in flight

  std::mutex mu_;
  bool busy_ = false, again_ = false;
  Stage stage_ = Stage::kStart;
  bool local_ = false;
  uint64_t transfer_ = 0;
  int64_t next_ = 0, max_ = 0;
  int sent_ = 0;
  bool write_in_flight_ = false, finished_ = false, cancelled_ = false, broken_ = false;
  bool waiting_ = false, gate_passed_ = false;
  bool alarm_pending_ = false, alarm_cancel_sent_ = false, delayed_ = false;
};

class FakePrefillCall final : public grpc::ServerUnaryReactor {
 public:
  static FakePrefillCall* Start(FakeWorker* worker, const PrefillRequest& request,
                                PrefillResponse* response);
  void OnCancel() override;
  void OnDone() override;

 private:
  FakePrefillCall(FakeWorker* worker, PrefillResponse* response)
      : worker_(worker), response_(response) {}
  void TryFinish(const grpc::Status& s) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (finished_) return;
      finished_ = true;
    }
    Finish(s);
  }
  FakeWorker* const worker_;
  PrefillResponse* const response_;
  std::mutex mu_;
  bool finished_ = false;
};

// What a fake saw.
struct FakeStats {
  int calls = 0;
  int cancellations = 0;
  int done = 0;
  int get_info = 0;
  std::vector<DecodeRequest> decode_requests;
  std::vector<std::chrono::system_clock::time_point> decode_deadlines;
  std::vector<PrefillRequest> prefill_requests;
};

class FakeWorker {
 public:
  FakeWorker(Role role, std::string name, uint64_t fingerprint, TokenScript script,
             SignalBoard* board)
      : role_(role),
        name_(std::move(name)),
        fingerprint_(fingerprint),
        script_(std::move(script)),
        board_(board),
        worker_svc_(this),
        decode_svc_(this),
        prefill_svc_(this) {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&worker_svc_);
    if (role == internal::v1::ROLE_DECODE) builder.RegisterService(&decode_svc_);
    if (role == internal::v1::ROLE_PREFILL) builder.RegisterService(&prefill_svc_);
    server_ = builder.BuildAndStart();
    address_ = "127.0.0.1:" + std::to_string(port);
    info_.set_name(name_);
    info_.set_incarnation_id(0x1000 + std::hash<std::string>()(name_) % 0x1000);
    info_.set_role(role);
    info_.set_grpc_address(address_);
    info_.set_backend("fake");
    info_.set_accelerator_vendor("cpu");
    info_.set_model_fingerprint(fingerprint);
    info_.mutable_kv_layout()->set_block_size(16);
  }
  ~FakeWorker() { Stop(); }
  void Stop() {
    if (server_) {
      server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
      server_.reset();
    }
  }

  const std::string& address() const { return address_; }
  const std::string& name() const { return name_; }
  WorkerInfo info() const {
    std::lock_guard<std::mutex> l(mu_);
    return info_;
  }
  void set_incarnation(uint64_t id) {
    std::lock_guard<std::mutex> l(mu_);
    info_.set_incarnation_id(id);
  }
  void set_decode(DecodeBehavior b) {
    std::lock_guard<std::mutex> l(mu_);
    decode_ = b;
  }
  void set_prefill(PrefillBehavior b) {
    std::lock_guard<std::mutex> l(mu_);
    prefill_ = b;
  }
  void set_load(WorkerLoad load) {
    std::lock_guard<std::mutex> l(mu_);
    load_ = load;
  }
  void set_get_info_fails(bool fails) {
    std::lock_guard<std::mutex> l(mu_);
    get_info_fails_ = fails;
  }
  void OpenGate() { board_->Raise(gate_key()); }

  FakeStats stats() const {
    std::lock_guard<std::mutex> l(mu_);
    return stats_;
  }
  // Waits until `pred(stats)` holds; false after `timeout`.
  bool WaitFor(const std::function<bool(const FakeStats&)>& pred,
               std::chrono::milliseconds timeout = std::chrono::seconds(10)) const {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, timeout, [&] { return pred(stats_); });
  }

  // Used by the fake calls.
  const TokenScript& script() const { return script_; }
  SignalBoard* board() const { return board_; }
  uint64_t fingerprint() const { return fingerprint_; }
  std::string gate_key() const { return "gate/" + name_; }
  DecodeBehavior decode_behavior() const {
    std::lock_guard<std::mutex> l(mu_);
    return decode_;
  }
  PrefillBehavior prefill_behavior() const {
    std::lock_guard<std::mutex> l(mu_);
    return prefill_;
  }
  template <typename F>
  void Record(F&& f) {
    {
      std::lock_guard<std::mutex> l(mu_);
      f(stats_);
    }
    cv_.notify_all();
  }

 private:
  class WorkerService final : public internal::v1::Worker::CallbackService {
   public:
    explicit WorkerService(FakeWorker* w) : w_(w) {}
    grpc::ServerUnaryReactor* GetInfo(grpc::CallbackServerContext* ctx,
                                      const internal::v1::GetInfoRequest*,
                                      internal::v1::GetInfoResponse* resp) override {
      grpc::Status status;
      {
        std::lock_guard<std::mutex> l(w_->mu_);
        ++w_->stats_.get_info;
        if (w_->get_info_fails_) {
          status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "injected GetInfo failure");
        } else {
          *resp->mutable_info() = w_->info_;
          *resp->mutable_load() = w_->load_;
        }
      }
      w_->cv_.notify_all();
      auto* r = ctx->DefaultReactor();
      r->Finish(status);
      return r;
    }

   private:
    FakeWorker* const w_;
  };
  class DecodeService final : public internal::v1::DecodeWorker::CallbackService {
   public:
    explicit DecodeService(FakeWorker* w) : w_(w) {}
    grpc::ServerWriteReactor<DecodeResponse>* Decode(grpc::CallbackServerContext* ctx,
                                                     const DecodeRequest* req) override {
      w_->Record([&](FakeStats& st) { st.decode_deadlines.push_back(ctx->deadline()); });
      return FakeDecodeStream::Start(w_, *req);
    }

   private:
    FakeWorker* const w_;
  };
  class PrefillService final : public internal::v1::PrefillWorker::CallbackService {
   public:
    explicit PrefillService(FakeWorker* w) : w_(w) {}
    grpc::ServerUnaryReactor* Prefill(grpc::CallbackServerContext*, const PrefillRequest* req,
                                      PrefillResponse* resp) override {
      return FakePrefillCall::Start(w_, *req, resp);
    }

   private:
    FakeWorker* const w_;
  };

  const Role role_;
  const std::string name_;
  const uint64_t fingerprint_;
  const TokenScript script_;
  SignalBoard* const board_;
  WorkerService worker_svc_;
  DecodeService decode_svc_;
  PrefillService prefill_svc_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;

  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  WorkerInfo info_;
  WorkerLoad load_;
  bool get_info_fails_ = false;
  DecodeBehavior decode_;
  PrefillBehavior prefill_;
  FakeStats stats_;
};

// ---- FakeDecodeStream ------------------------------------------------------------------------

inline FakeDecodeStream::FakeDecodeStream(FakeWorker* worker, const DecodeRequest& request)
    : worker_(worker), request_(request), b_(worker->decode_behavior()) {
  local_ = request.local_prefill() || b_.force_local;
  next_ = request.seq().output_ids_size();
  max_ = request.seq().sampling().max_tokens();
}

inline FakeDecodeStream* FakeDecodeStream::Start(FakeWorker* worker, const DecodeRequest& request) {
  std::shared_ptr<FakeDecodeStream> s(new FakeDecodeStream(worker, request));
  s->self_ = s;
  worker->Record([&](FakeStats& st) {
    ++st.calls;
    st.decode_requests.push_back(request);
  });
  s->Kick();
  return s.get();
}

inline void FakeDecodeStream::OnCancel() {
  worker_->Record([](FakeStats& st) { ++st.cancellations; });
  {
    std::lock_guard<std::mutex> l(mu_);
    cancelled_ = true;
  }
  Kick();
}

inline void FakeDecodeStream::OnDone() {
  worker_->Record([](FakeStats& st) { ++st.done; });
  std::shared_ptr<FakeDecodeStream> last = std::move(self_);  // may free this on return
}

inline FakeDecodeStream::Op FakeDecodeStream::NextOp(grpc::Status* status) {
  if (finished_ || write_in_flight_) return Op::kNone;
  if (cancelled_ || broken_) {
    if (alarm_pending_) {
      if (alarm_cancel_sent_) return Op::kNone;
      alarm_cancel_sent_ = true;
      return Op::kCancelAlarm;
    }
    finished_ = true;
    *status = grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
    return Op::kFinish;
  }
  if (alarm_pending_ || waiting_) return Op::kNone;
  const auto& prompt = request_.seq().prompt_ids();
  switch (stage_) {
    case Stage::kStart: {
      if (b_.gated && !gate_passed_) {
        gate_passed_ = true;
        waiting_ = true;
        return Op::kAwaitGate;
      }
      if (b_.reject != grpc::StatusCode::OK) {
        finished_ = true;
        *status = grpc::Status(b_.reject, "injected rejection");
        return Op::kFinish;
      }
      out_.Clear();
      if (local_) {
        out_.set_local_prefill(true);
        out_.set_cached_tokens(b_.cached_tokens);
        stage_ = Stage::kTokens;
      } else {
        transfer_ = worker_->board()->NewTransfer();
        auto* t = out_.mutable_ticket();
        t->set_kv_address("fake-kv");
        t->set_transfer_id(transfer_);
        t->set_token(std::string(16, 'k'));
        t->set_model_fingerprint(worker_->fingerprint());
        t->set_token_count(prompt.size() + request_.seq().output_ids_size());
        t->set_decode_incarnation(worker_->info().incarnation_id());
        for (int i = 0; i < b_.early_tokens && next_ < max_; ++i, ++next_, ++sent_) {
          auto* tok = out_.add_tokens();
          FillToken(worker_->script(), prompt, next_, static_cast<int32_t>(max_), tok);
          if (i == 0) tok->set_id(tok->id() + b_.first_id_offset);
        }
        stage_ = Stage::kAwaitKv;
      }
      write_in_flight_ = true;
      return Op::kWrite;
    }
    case Stage::kAwaitKv:
      stage_ = Stage::kTokens;
      waiting_ = true;
      return Op::kAwaitKv;
    case Stage::kTokens: {
      if (next_ >= max_) {
        finished_ = true;
        *status = grpc::Status::OK;
        return Op::kFinish;
      }
      if (b_.fail_after >= 0 && sent_ >= b_.fail_after) {
        finished_ = true;
        *status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "injected decode failure");
        return Op::kFinish;
      }
      if (b_.hang_after >= 0 && sent_ >= b_.hang_after) {
        waiting_ = true;  // until cancelled
        return Op::kNone;
      }
      if (b_.token_delay.count() > 0 && !delayed_) {
        delayed_ = true;
        alarm_pending_ = true;
        return Op::kAlarm;
      }
      delayed_ = false;
      out_.Clear();
      for (int k = 0; k < b_.tokens_per_message && next_ < max_; ++k, ++next_, ++sent_) {
        FillToken(worker_->script(), prompt, next_, static_cast<int32_t>(max_), out_.add_tokens());
      }
      write_in_flight_ = true;
      return Op::kWrite;
    }
  }
  return Op::kNone;
}

inline void FakeDecodeStream::Kick() {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (busy_) {
      again_ = true;
      return;
    }
    busy_ = true;
  }
  std::weak_ptr<FakeDecodeStream> weak = weak_from_this();
  for (;;) {
    grpc::Status status;
    Op op;
    {
      std::lock_guard<std::mutex> l(mu_);
      op = NextOp(&status);
      if (op == Op::kNone) {
        if (!again_) {
          busy_ = false;
          return;
        }
        again_ = false;
        continue;
      }
    }
    switch (op) {
      case Op::kWrite:
        StartWrite(&out_);
        break;
      case Op::kFinish:
        Finish(status);
        break;
      case Op::kAlarm:
        alarm_.Set(std::chrono::system_clock::now() + b_.token_delay, [weak](bool) {
          if (auto s = weak.lock()) {
            {
              std::lock_guard<std::mutex> l(s->mu_);
              s->alarm_pending_ = false;
            }
            s->Kick();
          }
        });
        break;
      case Op::kCancelAlarm:
        alarm_.Cancel();
        break;
      case Op::kAwaitGate:
        worker_->board()->OnRaised(worker_->gate_key(), [weak] {
          if (auto s = weak.lock()) s->Wake();
        });
        break;
      case Op::kAwaitKv:
        worker_->board()->OnRaised("landed/" + std::to_string(transfer_), [weak] {
          if (auto s = weak.lock()) s->Wake();
        });
        break;
      case Op::kNone:
        break;
    }
  }
}

// ---- FakePrefillCall -------------------------------------------------------------------------

inline FakePrefillCall* FakePrefillCall::Start(FakeWorker* worker, const PrefillRequest& request,
                                               PrefillResponse* response) {
  auto* call = new FakePrefillCall(worker, response);
  worker->Record([&](FakeStats& st) {
    ++st.calls;
    st.prefill_requests.push_back(request);
  });
  const PrefillBehavior b = worker->prefill_behavior();
  if (b.fail != grpc::StatusCode::OK) {
    call->TryFinish(grpc::Status(b.fail, "injected prefill failure"));
  } else if (!b.hang) {
    const auto& seq = request.seq();
    FillToken(worker->script(), seq.prompt_ids(), seq.output_ids_size(),
              seq.sampling().max_tokens(), response->mutable_first());
    response->set_cached_tokens(b.cached_tokens);
    // The KV "lands" (END frame sent) before the response, as with the real data plane.
    worker->board()->Raise("landed/" + std::to_string(request.ticket().transfer_id()));
    call->TryFinish(grpc::Status::OK);
  }
  return call;
}

inline void FakePrefillCall::OnCancel() {
  worker_->Record([](FakeStats& st) { ++st.cancellations; });
  TryFinish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
}

inline void FakePrefillCall::OnDone() {
  worker_->Record([](FakeStats& st) { ++st.done; });
  delete this;
}

}  // namespace tandem::testing
