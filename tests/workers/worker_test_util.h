// A prefill worker and a decode worker in this process, each on its own gRPC server on
// 127.0.0.1:0, driven through real stubs the way the router drives them: Decode -> ticket ->
// Prefill(ticket) -> tokens.
#pragma once

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "decode_worker/decode_worker.h"
#include "prefill_worker/prefill_worker.h"
#include "tandem/internal/v1/worker.grpc.pb.h"

namespace tandem::testing_util {

namespace iv1 = ::tandem::internal::v1;

inline std::string TestData(const std::string& rel) {
  return std::string(TANDEM_TEST_DATA_DIR) + "/" + rel;
}
inline std::string DemoModelDir() { return TANDEM_DEMO_MODEL_DIR; }

inline EngineOptions Options(const std::string& dir, int32_t block_size, DType dtype) {
  EngineOptions o;
  o.model_dir = dir;
  o.num_kv_blocks = 256;
  o.block_size = block_size;
  o.kv_dtype = dtype;
  o.num_threads = 1;
  return o;
}

inline int VocabSize(const EngineOptions& options) {
  auto engine = Engine::Create(options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? (*engine)->config().vocab_size : 1;
}

inline std::vector<int32_t> Prompt(int len, int salt, int vocab) {
  std::vector<int32_t> p;
  for (int i = 0; i < len; ++i) p.push_back((i * 53 + salt * 97 + 3) % vocab);
  return p;
}

// Greedy unless `seed` is given (then temperature 0.8 with that seed); EOS ignored.
inline iv1::SequenceSpec Spec(const std::vector<int32_t>& prompt, int max_tokens,
                              std::optional<uint64_t> seed = std::nullopt) {
  iv1::SequenceSpec s;
  s.set_request_id("test");
  for (int32_t id : prompt) s.add_prompt_ids(id);
  auto* p = s.mutable_sampling();
  p->set_max_tokens(max_tokens);
  p->set_temperature(seed ? 0.8f : 0.0f);
  if (seed) p->set_seed(*seed);
  p->set_ignore_eos(true);
  return s;
}

inline std::chrono::system_clock::time_point In(std::chrono::milliseconds d) {
  return std::chrono::system_clock::now() + d;
}

// Bounded poll for state another thread publishes without a signal to wait on (load snapshots,
// blocks coming back). True once `done()` holds, false after `timeout`.
template <typename Pred>
bool Eventually(Pred done, std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

class TestServer {
 public:
  explicit TestServer(const std::vector<grpc::Service*>& services) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    for (grpc::Service* s : services) builder.RegisterService(s);
    server_ = builder.BuildAndStart();
  }
  ~TestServer() { Shutdown(); }
  void Shutdown() {
    if (server_) {
      server_->Shutdown(In(std::chrono::seconds(5)));
      server_->Wait();
      server_.reset();
    }
  }
  bool ok() const { return server_ != nullptr && port_ != 0; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

 private:
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

struct ClusterOptions {
  EngineOptions prefill;
  EngineOptions decode;
  std::chrono::milliseconds transfer_timeout{30000};
};

// What one request produced, as the router would see it.
struct RunResult {
  std::vector<int32_t> ids;  // output positions len(output_ids).. in order
  grpc::Status decode_status;
  grpc::Status prefill_status;  // OK when no prefill was called
  bool local_prefill = false;
  bool got_ticket = false;
};

class Cluster {
 public:
  explicit Cluster(const ClusterOptions& options);
  ~Cluster();

  DecodeWorker& decode() { return *decode_; }
  PrefillWorker& prefill() { return *prefill_; }
  iv1::DecodeWorker::Stub& decode_stub() { return *decode_stub_; }
  iv1::PrefillWorker::Stub& prefill_stub() { return *prefill_stub_; }
  iv1::Worker::Stub& decode_info_stub() { return *decode_info_; }
  iv1::Worker::Stub& prefill_info_stub() { return *prefill_info_; }
  TestServer& decode_server() { return *decode_server_; }
  TestServer& prefill_server() { return *prefill_server_; }

  // Decode -> ticket -> Prefill -> tokens (or local prefill when asked or chosen).
  RunResult Run(const iv1::SequenceSpec& spec, bool local_prefill = false);

  // Waits (bounded) until no call is in flight and every KV block is free on both workers,
  // then checks the pools' invariants.
  void ExpectIdle();

 private:
  std::unique_ptr<DecodeWorker> decode_;
  std::unique_ptr<PrefillWorker> prefill_;
  std::unique_ptr<TestServer> decode_server_;
  std::unique_ptr<TestServer> prefill_server_;
  std::unique_ptr<iv1::DecodeWorker::Stub> decode_stub_;
  std::unique_ptr<iv1::PrefillWorker::Stub> prefill_stub_;
  std::unique_ptr<iv1::Worker::Stub> decode_info_;
  std::unique_ptr<iv1::Worker::Stub> prefill_info_;
};

// A Decode call driven by hand: the first message is read at construction.
class DecodeStream {
 public:
  DecodeStream(Cluster& cluster, const iv1::SequenceSpec& spec, bool local_prefill = false,
               std::chrono::milliseconds timeout = std::chrono::seconds(120)) {
    ctx.set_deadline(In(timeout));
    iv1::DecodeRequest req;
    *req.mutable_seq() = spec;
    req.set_local_prefill(local_prefill);
    reader = cluster.decode_stub().Decode(&ctx, req);
    got_first = reader->Read(&first);
  }
  // Token ids with index >= `from` until the stream ends (the first message's tokens included).
  std::vector<int32_t> ReadTokens(int32_t from) {
    std::vector<int32_t> ids;
    iv1::DecodeResponse msg = first;
    first.clear_tokens();
    bool more = got_first;
    while (more) {
      for (const auto& t : msg.tokens()) {
        if (t.index() >= from) ids.push_back(t.id());
      }
      more = reader->Read(&msg);
    }
    return ids;
  }
  // Reads up to `n` more tokens (fewer if the stream ends).
  int ReadSome(int n) {
    int got = first.tokens_size();
    iv1::DecodeResponse msg;
    while (got < n && reader->Read(&msg)) got += msg.tokens_size();
    return got;
  }
  grpc::Status Finish() {
    iv1::DecodeResponse msg;
    while (reader->Read(&msg)) {
    }
    return reader->Finish();
  }

  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReader<iv1::DecodeResponse>> reader;
  iv1::DecodeResponse first;
  bool got_first = false;
};

// ---- inline implementations (one test binary; kept here to stay header-only) ----

// Output ids of a local engine run (the reference the disaggregated path must equal).
inline std::vector<int32_t> LocalRun(const EngineOptions& options, const iv1::SequenceSpec& spec) {
  auto engine = Engine::Create(options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return {};
  SequenceRequest r;
  r.prompt_ids.assign(spec.prompt_ids().begin(), spec.prompt_ids().end());
  r.output_ids.assign(spec.output_ids().begin(), spec.output_ids().end());
  r.sampling.max_tokens = spec.sampling().max_tokens();
  r.sampling.temperature = spec.sampling().temperature();
  if (spec.sampling().has_seed()) r.sampling.seed = spec.sampling().seed();
  r.sampling.ignore_eos = spec.sampling().ignore_eos();
  auto res = (*engine)->Generate(r);
  EXPECT_TRUE(res.ok()) << res.status();
  return res.ok() ? res->output_ids : std::vector<int32_t>{};
}

inline Cluster::Cluster(const ClusterOptions& options) {
  PrefillWorkerOptions po;
  po.engine = options.prefill;
  po.model_name = "test-model";
  auto p = PrefillWorker::Create(po);
  EXPECT_TRUE(p.ok()) << p.status();
  prefill_ = *std::move(p);
  DecodeWorkerOptions dopt;
  dopt.engine = options.decode;
  dopt.model_name = "test-model";
  dopt.transfer_timeout = options.transfer_timeout;
  auto d = DecodeWorker::Create(dopt);
  EXPECT_TRUE(d.ok()) << d.status();
  decode_ = *std::move(d);
  prefill_server_ = std::make_unique<TestServer>(prefill_->services());
  decode_server_ = std::make_unique<TestServer>(decode_->services());
  EXPECT_TRUE(prefill_server_->ok() && decode_server_->ok());
  prefill_->SetGrpcAddress(prefill_server_->address());
  decode_->SetGrpcAddress(decode_server_->address());
  auto pch = grpc::CreateChannel(prefill_server_->address(), grpc::InsecureChannelCredentials());
  auto dch = grpc::CreateChannel(decode_server_->address(), grpc::InsecureChannelCredentials());
  prefill_stub_ = iv1::PrefillWorker::NewStub(pch);
  prefill_info_ = iv1::Worker::NewStub(pch);
  decode_stub_ = iv1::DecodeWorker::NewStub(dch);
  decode_info_ = iv1::Worker::NewStub(dch);
}

inline Cluster::~Cluster() {
  // Services must outlive their servers.
  decode_server_->Shutdown();
  prefill_server_->Shutdown();
  decode_.reset();
  prefill_.reset();
}

inline RunResult Cluster::Run(const iv1::SequenceSpec& spec, bool local_prefill) {
  RunResult r;
  grpc::ClientContext ctx;
  ctx.set_deadline(In(std::chrono::seconds(120)));
  iv1::DecodeRequest req;
  *req.mutable_seq() = spec;
  req.set_local_prefill(local_prefill);
  auto reader = decode_stub_->Decode(&ctx, req);
  std::map<int32_t, int32_t> by_index;
  auto add = [&](const iv1::GeneratedToken& t) {
    auto [it, fresh] = by_index.emplace(t.index(), t.id());
    if (!fresh) {
      EXPECT_EQ(it->second, t.id()) << "index " << t.index() << " sent twice with different ids";
    }
  };
  iv1::DecodeResponse msg;
  if (!reader->Read(&msg)) {
    r.decode_status = reader->Finish();
    return r;
  }
  if (msg.has_ticket()) {
    r.got_ticket = true;
    iv1::PrefillRequest preq;
    *preq.mutable_seq() = spec;
    *preq.mutable_ticket() = msg.ticket();
    grpc::ClientContext pctx;
    pctx.set_deadline(In(std::chrono::seconds(120)));
    iv1::PrefillResponse presp;
    r.prefill_status = prefill_stub_->Prefill(&pctx, preq, &presp);
    if (r.prefill_status.ok()) {
      EXPECT_EQ(presp.first().index(), spec.output_ids_size());
      add(presp.first());
    } else {
      ctx.TryCancel();  // the router would retry or fall back; here the request just ends
    }
  } else {
    r.local_prefill = msg.local_prefill();
  }
  do {
    for (const auto& t : msg.tokens()) add(t);
  } while (reader->Read(&msg));
  r.decode_status = reader->Finish();
  int32_t next = spec.output_ids_size();
  for (const auto& [index, id] : by_index) {
    EXPECT_EQ(index, next) << "gap in the output";
    next = index + 1;
    r.ids.push_back(id);
  }
  return r;
}

inline void Cluster::ExpectIdle() {
  // Blocks come back on the loop and data-plane threads after the calls end.
  Eventually([&] {
    return decode_->in_flight() == 0 && prefill_->in_flight() == 0 &&
           decode_->free_blocks() == decode_->total_blocks() &&
           prefill_->free_blocks() == prefill_->total_blocks() &&
           decode_->Load().running_sequences() == 0 && prefill_->Load().running_sequences() == 0;
  });
  EXPECT_EQ(decode_->in_flight(), 0);
  EXPECT_EQ(prefill_->in_flight(), 0);
  EXPECT_EQ(decode_->free_blocks(), decode_->total_blocks());
  EXPECT_EQ(prefill_->free_blocks(), prefill_->total_blocks());
  EXPECT_EQ(decode_->Load().running_sequences(), 0);
  EXPECT_EQ(decode_->CheckKvInvariants(), "");
  EXPECT_EQ(prefill_->CheckKvInvariants(), "");
  EXPECT_TRUE(decode_->Healthy());
  EXPECT_TRUE(prefill_->Healthy());
}

}  // namespace tandem::testing_util
