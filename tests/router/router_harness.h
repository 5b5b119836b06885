// A Router on a real gRPC server (127.0.0.1:0) with client stubs for the public API and the
// registry, and helpers to register fake workers and run Generate calls.
#pragma once

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/model.h"
#include "router/router.h"
#include "tandem/internal/v1/worker.grpc.pb.h"
#include "tandem/v1/tandem.grpc.pb.h"
#include "tests/router/fake_workers.h"

namespace tandem::testing {

inline std::string DemoModelDir() { return TANDEM_DEMO_MODEL_DIR; }
inline std::string FixtureModelDir() {
  return std::string(TANDEM_TEST_DATA_DIR) + "/models/llama3_gqa_bf16";
}

inline uint64_t FingerprintOf(const std::string& dir) {
  auto w = LoadModelWeights(dir);
  EXPECT_TRUE(w.ok()) << w.status();
  return w.ok() ? (*w)->fingerprint : 0;
}

struct GenerateResult {
  grpc::Status status;
  std::vector<int32_t> ids;
  std::string text;
  std::vector<v1::TokenLogprobs> logprobs;
  std::string finish_reason;
  v1::Usage usage;
  int messages = 0;
  bool finish_only_on_last = true;  // finish_reason/usage appeared on the last message only
};

inline v1::GenerateRequest IdsRequest(const std::vector<int32_t>& prompt, int max_tokens) {
  v1::GenerateRequest r;
  for (int32_t id : prompt) r.mutable_token_ids()->add_ids(id);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  return r;
}

class RouterHarness {
 public:
  explicit RouterHarness(RouterOptions options) {
    auto r = Router::Create(std::move(options));
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return;
    router_ = *std::move(r);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    for (grpc::Service* s : router_->services()) builder.RegisterService(s);
    server_ = builder.BuildAndStart();
    address_ = "127.0.0.1:" + std::to_string(port);
    auto channel = grpc::CreateChannel(address_, grpc::InsecureChannelCredentials());
    api_ = v1::Tandem::NewStub(channel);
    registry_ = internal::v1::Registry::NewStub(channel);
  }
  ~RouterHarness() {
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    router_.reset();  // waits for every call the router still tracks
  }

  Router& router() { return *router_; }
  v1::Tandem::Stub& api() { return *api_; }
  internal::v1::Registry::Stub& registry() { return *registry_; }

  grpc::Status Register(const WorkerInfo& info, internal::v1::RegisterResponse* out = nullptr) {
    internal::v1::RegisterRequest req;
    *req.mutable_info() = info;
    internal::v1::RegisterResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc::Status s = registry_->Register(&ctx, req, &resp);
    if (out) *out = resp;
    return s;
  }
  // Registers `w` (with `load`) and waits until the router lists it.
  void Add(FakeWorker& w, WorkerLoad load = {}) {
    ASSERT_TRUE(Register(w.info()).ok());
    Heartbeat(w, load);
    const uint64_t inc = w.info().incarnation_id();
    ASSERT_TRUE(router_->AwaitWorkers(
        [&](const std::vector<WorkerView>& v) {
          for (const auto& x : v) {
            if (x.info.name() == w.name() && x.info.incarnation_id() == inc && x.up) return true;
          }
          return false;
        },
        std::chrono::seconds(5)));
  }
  bool Heartbeat(const FakeWorker& w, WorkerLoad load, bool draining = false) {
    const WorkerInfo info = w.info();
    return Heartbeat(info.name(), info.incarnation_id(), load, draining);
  }
  bool Heartbeat(const std::string& name, uint64_t incarnation, WorkerLoad load,
                 bool draining = false) {
    internal::v1::HeartbeatRequest req;
    req.set_name(name);
    req.set_incarnation_id(incarnation);
    *req.mutable_load() = load;
    req.set_draining(draining);
    internal::v1::HeartbeatResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc::Status s = registry_->Heartbeat(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp.known();
  }

  // Runs one Generate to its end. `on_message` sees every message (and may cancel `ctx`).
  GenerateResult Generate(const v1::GenerateRequest& request,
                          std::chrono::milliseconds deadline = std::chrono::seconds(20),
                          const std::function<void(grpc::ClientContext*,
                                                   const v1::GenerateResponse&)>& on_message = {}) {
    GenerateResult out;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + deadline);
    auto reader = api_->Generate(&ctx, request);
    v1::GenerateResponse msg;
    bool finished_seen = false;
    while (reader->Read(&msg)) {
      ++out.messages;
      if (finished_seen) out.finish_only_on_last = false;
      out.ids.insert(out.ids.end(), msg.token_ids().begin(), msg.token_ids().end());
      out.text += msg.text();
      for (const auto& lp : msg.logprobs()) out.logprobs.push_back(lp);
      if (!msg.finish_reason().empty()) {
        finished_seen = true;
        out.finish_reason = msg.finish_reason();
        out.usage = msg.usage();
      }
      if (on_message) on_message(&ctx, msg);
    }
    out.status = reader->Finish();
    return out;
  }

 private:
  std::unique_ptr<Router> router_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
  std::unique_ptr<v1::Tandem::Stub> api_;
  std::unique_ptr<internal::v1::Registry::Stub> registry_;
};

// Sends heartbeats for a worker every `interval` until destroyed (what a live worker does).
class HeartbeatPump {
 public:
  HeartbeatPump(RouterHarness* h, const FakeWorker* w, WorkerLoad load,
                std::chrono::milliseconds interval)
      : thread_([=, this] {
          std::unique_lock<std::mutex> l(mu_);
          while (!cv_.wait_for(l, interval, [this] { return stop_; })) {
            l.unlock();
            h->Heartbeat(*w, load);
            l.lock();
          }
        }) {}
  ~HeartbeatPump() { Stop(); }
  void Stop() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

inline WorkerLoad DecodeLoad(int free_blocks, int running = 0) {
  WorkerLoad l;
  l.set_free_kv_blocks(free_blocks);
  l.set_total_kv_blocks(4096);
  l.set_running_sequences(running);
  return l;
}

inline WorkerLoad PrefillLoad(int64_t queued_tokens) {
  WorkerLoad l;
  l.set_queued_prefill_tokens(queued_tokens);
  return l;
}

}  // namespace tandem::testing
