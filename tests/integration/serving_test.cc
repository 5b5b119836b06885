// End to end over real processes on loopback: a router, prefill and decode workers started as
// `tandem` subcommands, driven through the public gRPC API. Tokens must equal the offline
// engine's (what `tandem generate` prints) through disaggregation, failures and re-admission;
// every worker's KV pool must be fully free afterwards.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <future>
#include <memory>
#include <mutex>
#include <thread>

#include "engine/engine.h"
#include "tandem/internal/v1/worker.grpc.pb.h"
#include "tandem/v1/tandem.grpc.pb.h"
#include "tests/integration/process.h"
#include "tests/integration/worker_probe.h"

namespace tandem {
namespace {

using testing_util::AllBlocksFree;
using testing_util::ScrapeMetrics;
using testing_util::TandemProcess;
namespace iv1 = internal::v1;

const std::string kModel = std::string(TANDEM_TEST_DATA_DIR) + "/models/llama3_gqa_bf16";

std::string LogDir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  auto dir = std::filesystem::temp_directory_path() /
             ("tandem-it-" + std::to_string(getpid())) / info->name();
  std::filesystem::create_directories(dir);
  return dir.string();
}

struct WorkerFlags {
  std::string kv_dtype = "f32";
  int block_size = 16;
  std::vector<std::string> extra;
};

// One router plus prefill and decode worker processes.
class Cluster {
 public:
  Cluster(int prefill, int decode, std::vector<std::string> router_extra = {},
          WorkerFlags pf = {}, WorkerFlags df = {}) {
    const std::string logs = LogDir();
    std::vector<std::string> rargs{"router", "--model", kModel, "--grpc-port", "0",
                                   "--heartbeat-interval-ms", "200", "--drain-grace-s", "60"};
    rargs.insert(rargs.end(), router_extra.begin(), router_extra.end());
    router_ = std::make_unique<TandemProcess>(rargs, logs + "/router.log");
    ok_ = router_->WaitReady();
    if (!ok_) return;
    router_addr_ = router_->field("grpc");
    for (int i = 0; i < decode; ++i) Start("decode", i, df, logs);
    for (int i = 0; i < prefill; ++i) Start("prefill", i, pf, logs);
    channel_ = grpc::CreateChannel(router_addr_, grpc::InsecureChannelCredentials());
    stub_ = v1::Tandem::NewStub(channel_);
  }

  bool ok() const { return ok_; }
  v1::Tandem::Stub& stub() { return *stub_; }
  TandemProcess& decode(int i) { return *decode_[i]; }
  TandemProcess& prefill(int i) { return *prefill_[i]; }
  TandemProcess& router() { return *router_; }
  std::vector<TandemProcess*> workers() {
    std::vector<TandemProcess*> all;
    for (auto& p : prefill_) all.push_back(p.get());
    for (auto& d : decode_) all.push_back(d.get());
    return all;
  }

 private:
  void Start(const std::string& role, int i, const WorkerFlags& wf, const std::string& logs) {
    std::vector<std::string> args{role, "--model", kModel, "--grpc-port", "0", "--router",
                                  router_addr_, "--threads", "1", "--num-kv-blocks", "256",
                                  "--kv-dtype", wf.kv_dtype, "--block-size",
                                  std::to_string(wf.block_size), "--drain-grace-s", "5",
                                  "--transfer-timeout-ms", "5000"};
    args.insert(args.end(), wf.extra.begin(), wf.extra.end());
    auto p = std::make_unique<TandemProcess>(args, logs + "/" + role + std::to_string(i) + ".log");
    ok_ = ok_ && p->WaitReady();
    (role == "decode" ? decode_ : prefill_).push_back(std::move(p));
  }

  bool ok_ = false;
  std::unique_ptr<TandemProcess> router_;
  std::string router_addr_;
  std::vector<std::unique_ptr<TandemProcess>> prefill_, decode_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Tandem::Stub> stub_;
};

struct Outcome {
  grpc::Status status;
  std::vector<int32_t> ids;
  std::string finish;
  int messages_after_finish = 0;
  v1::Usage usage;
};

Outcome Generate(v1::Tandem::Stub& stub, const v1::GenerateRequest& req,
                 std::chrono::milliseconds timeout = std::chrono::seconds(60),
                 grpc::ClientContext* ctx_in = nullptr) {
  Outcome o;
  grpc::ClientContext local;
  grpc::ClientContext& ctx = ctx_in ? *ctx_in : local;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  auto reader = stub.Generate(&ctx, req);
  v1::GenerateResponse resp;
  while (reader->Read(&resp)) {
    if (!o.finish.empty()) ++o.messages_after_finish;
    o.ids.insert(o.ids.end(), resp.token_ids().begin(), resp.token_ids().end());
    if (!resp.finish_reason().empty()) o.finish = resp.finish_reason();
    if (resp.has_usage()) o.usage = resp.usage();
  }
  o.status = reader->Finish();
  return o;
}

std::vector<int32_t> Prompt(int len, int salt, int vocab) {
  std::vector<int32_t> p;
  for (int i = 0; i < len; ++i) p.push_back((i * 31 + salt * 89 + 11) % vocab);
  return p;
}

v1::GenerateRequest Request(const std::vector<int32_t>& prompt, int max_tokens,
                            std::optional<uint64_t> seed = std::nullopt) {
  v1::GenerateRequest r;
  for (int32_t id : prompt) r.mutable_token_ids()->add_ids(id);
  auto* s = r.mutable_sampling();
  s->set_max_tokens(max_tokens);
  s->set_ignore_eos(true);
  if (seed) {
    s->set_temperature(0.8f);
    s->set_seed(*seed);
  } else {
    s->set_temperature(0.0f);
  }
  return r;
}

// The offline engine's tokens (`tandem generate` runs exactly this).
class Reference {
 public:
  explicit Reference(DType kv_dtype = DType::kF32) {
    EngineOptions o;
    o.model_dir = kModel;
    o.kv_dtype = kv_dtype;
    o.num_kv_blocks = 512;
    o.num_threads = 1;
    engine_ = *Engine::Create(o);
  }
  std::vector<int32_t> Tokens(const std::vector<int32_t>& prompt, int max_tokens,
                              std::optional<uint64_t> seed = std::nullopt) {
    SequenceRequest r;
    r.prompt_ids = prompt;
    r.sampling.max_tokens = max_tokens;
    r.sampling.ignore_eos = true;
    r.sampling.temperature = seed ? 0.8f : 0.0f;
    r.sampling.seed = seed;
    return engine_->Generate(r)->output_ids;
  }
  int vocab() const { return engine_->config().vocab_size; }

 private:
  std::unique_ptr<Engine> engine_;
};

void ExpectWorkersIdle(Cluster& c) {
  for (TandemProcess* w : c.workers()) {
    if (w->Wait(std::chrono::milliseconds(0)) >= 0) continue;  // killed by the test
    std::string detail;
    EXPECT_TRUE(AllBlocksFree(w->field("grpc"), &detail)) << detail;
  }
}

TEST(ServingTest, ThirtyTwoConcurrentStreamsGiveTheOfflineTokens) {
  Cluster c(2, 2);
  ASSERT_TRUE(c.ok());
  Reference ref;
  constexpr int kN = 32;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<int> lens;
  std::vector<std::optional<uint64_t>> seeds;
  for (int i = 0; i < kN; ++i) {
    prompts.push_back(Prompt(1 + (i * 7) % 60, i, ref.vocab()));
    lens.push_back(4 + (i * 5) % 28);
    seeds.push_back(i % 4 == 3 ? std::optional<uint64_t>(1000 + i) : std::nullopt);
  }
  std::vector<Outcome> out(kN);
  std::vector<std::thread> threads;
  for (int i = 0; i < kN; ++i) {
    threads.emplace_back([&, i] { out[i] = Generate(c.stub(), Request(prompts[i], lens[i], seeds[i])); });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kN; ++i) {
    ASSERT_TRUE(out[i].status.ok()) << i << ": " << out[i].status.error_message();
    EXPECT_EQ(out[i].ids, ref.Tokens(prompts[i], lens[i], seeds[i])) << "request " << i;
    EXPECT_EQ(out[i].finish, "length");
    EXPECT_EQ(out[i].messages_after_finish, 0);
    EXPECT_EQ(out[i].usage.prompt_tokens(), static_cast<int>(prompts[i].size()));
    EXPECT_EQ(out[i].usage.completion_tokens(), lens[i]);
  }
  // Seeded sampling is reproducible: the same request again gives the same tokens.
  const Outcome again = Generate(c.stub(), Request(prompts[3], lens[3], seeds[3]));
  EXPECT_EQ(again.ids, out[3].ids);
  ExpectWorkersIdle(c);
}

TEST(ServingTest, HeterogeneousKvLayoutsGiveTheSameTokens) {
  // The prefill side's KV (its dtype and block size) is converted on landing into the decode
  // side's layout. Where the prefill side computes in f32 KV, the tokens must equal the offline
  // f32 engine's (f16 storage on the decode side does not flip a token of this fixture); a bf16
  // pair must equal the offline engine run with bf16 KV. (A prefill worker with reduced-precision
  // KV attends over rounded keys during the prompt, so its first tokens legitimately differ from
  // an f32 run; the transfer itself is bit-exact, see kvcache's round-trip tests.)
  Reference f32_ref;
  Reference bf16_ref(DType::kBF16);
  struct PairCase {
    WorkerFlags prefill, decode;
    Reference* ref;
  };
  for (const PairCase& pc : {PairCase{{"f32", 8, {}}, {"f32", 4, {}}, &f32_ref},
                             PairCase{{"f32", 16, {}}, {"f16", 32, {}}, &f32_ref},
                             PairCase{{"bf16", 16, {}}, {"bf16", 4, {}}, &bf16_ref}}) {
    const WorkerFlags& pf = pc.prefill;
    const WorkerFlags& df = pc.decode;
    Reference& ref = *pc.ref;
    Cluster c(1, 1, {}, pf, df);
    ASSERT_TRUE(c.ok());
    for (int i = 0; i < 4; ++i) {
      const auto prompt = Prompt(5 + 13 * i, i, ref.vocab());
      const Outcome o = Generate(c.stub(), Request(prompt, 12));
      ASSERT_TRUE(o.status.ok()) << o.status.error_message();
      EXPECT_EQ(o.ids, ref.Tokens(prompt, 12)) << pf.kv_dtype << "/" << pf.block_size << " -> "
                                               << df.kv_dtype << "/" << df.block_size;
    }
    ExpectWorkersIdle(c);
  }
}

TEST(ServingTest, KilledWorkersUnderLoadLoseNoTokens) {
  Cluster c(2, 2, {"--max-attempts", "4"});
  ASSERT_TRUE(c.ok());
  Reference ref;
  constexpr int kN = 24;
  constexpr int kMax = 300;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < kN; ++i) prompts.push_back(Prompt(8 + (i * 11) % 90, 50 + i, ref.vocab()));
  std::vector<Outcome> out(kN);
  std::atomic<int> tokens_seen{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kN; ++i) {
    threads.emplace_back([&, i] {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(90));
      auto reader = c.stub().Generate(&ctx, Request(prompts[i], kMax));
      v1::GenerateResponse resp;
      while (reader->Read(&resp)) {
        out[i].ids.insert(out[i].ids.end(), resp.token_ids().begin(), resp.token_ids().end());
        tokens_seen += resp.token_ids_size();
        if (!resp.finish_reason().empty()) out[i].finish = resp.finish_reason();
      }
      out[i].status = reader->Finish();
    });
  }
  // Kill a decode worker once streams are flowing, then a prefill worker while the second half
  // of the prompts is still being prefilled.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (tokens_seen < kN * 4 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  c.decode(0).KillNow();
  c.prefill(0).KillNow();
  for (auto& t : threads) t.join();
  int ok = 0;
  for (int i = 0; i < kN; ++i) {
    const auto want = ref.Tokens(prompts[i], kMax);
    if (out[i].status.ok()) {
      ++ok;
      EXPECT_EQ(out[i].ids, want) << "request " << i;
    } else {
      // An explicit failure: whatever arrived is a prefix of the right answer.
      EXPECT_EQ(out[i].status.error_code(), grpc::StatusCode::UNAVAILABLE)
          << out[i].status.error_message();
      ASSERT_LE(out[i].ids.size(), want.size());
      EXPECT_TRUE(std::equal(out[i].ids.begin(), out[i].ids.end(), want.begin())) << i;
    }
  }
  EXPECT_GT(ok, kN / 2);
  // The kills hit streams in flight: the router re-admitted some of them.
  const std::string metrics = ScrapeMetrics(c.router().field("metrics"));
  EXPECT_NE(metrics.find("tandem_request_readmissions_total"), std::string::npos);
  EXPECT_EQ(metrics.find("tandem_request_readmissions_total{model=\"llama3_gqa_bf16\"} 0\n"),
            std::string::npos)
      << "no request was re-admitted; the kills came too late to test anything";
  // The survivors still serve.
  const auto prompt = Prompt(20, 7, ref.vocab());
  const Outcome after = Generate(c.stub(), Request(prompt, 8));
  ASSERT_TRUE(after.status.ok()) << after.status.error_message();
  EXPECT_EQ(after.ids, ref.Tokens(prompt, 8));
  ExpectWorkersIdle(c);
}

TEST(ServingTest, CancellationAndDeadlinesFreeEveryBlock) {
  Cluster c(1, 1);
  ASSERT_TRUE(c.ok());
  Reference ref;
  std::vector<std::thread> threads;
  for (int i = 0; i < 6; ++i) {
    threads.emplace_back([&, i] {
      const auto req = Request(Prompt(30 + i, i, ref.vocab()), 3000);
      if (i % 2 == 0) {
        // Deadline expiry mid-stream.
        const Outcome o = Generate(c.stub(), req, std::chrono::milliseconds(150 + 50 * i));
        EXPECT_EQ(o.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
      } else {
        // Client cancellation after a few tokens.
        grpc::ClientContext ctx;
        auto reader = c.stub().Generate(&ctx, req);
        v1::GenerateResponse resp;
        int n = 0;
        while (reader->Read(&resp) && (n += resp.token_ids_size()) < 3 * i) {
        }
        ctx.TryCancel();
        while (reader->Read(&resp)) {
        }
        EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
      }
    });
  }
  for (auto& t : threads) t.join();
  ExpectWorkersIdle(c);
}

TEST(ServingTest, BadInputFailsAloneWithTheFieldNamed) {
  Cluster c(1, 1);
  ASSERT_TRUE(c.ok());
  Reference ref;
  auto base = [&] { return Request(Prompt(10, 1, ref.vocab()), 8); };
  struct Case {
    std::string field;
    std::function<void(v1::GenerateRequest&)> mutate;
  };
  const std::vector<Case> cases = {
      {"prompt", [](auto& r) { r.mutable_token_ids()->clear_ids(); }},
      {"prompt", [&](auto& r) {
         r.mutable_token_ids()->clear_ids();
         for (int i = 0; i < 140000; ++i) r.mutable_token_ids()->add_ids(1);
       }},
      {"max_tokens", [](auto& r) { r.mutable_sampling()->set_max_tokens(0); }},
      {"max_tokens", [](auto& r) { r.mutable_sampling()->set_max_tokens(-3); }},
      {"max_tokens", [](auto& r) { r.mutable_sampling()->set_max_tokens(1 << 30); }},
      {"temperature", [](auto& r) { r.mutable_sampling()->set_temperature(-1.0f); }},
      {"temperature", [](auto& r) { r.mutable_sampling()->set_temperature(std::nanf("")); }},
      {"top_p", [](auto& r) { r.mutable_sampling()->set_top_p(0.0f); }},
      {"top_p", [](auto& r) { r.mutable_sampling()->set_top_p(1.5f); }},
      {"top_k", [](auto& r) { r.mutable_sampling()->set_top_k(-2); }},
      {"model", [](auto& r) { r.set_model("no-such-model"); }},
      {"prompt", [](auto& r) { r.set_text("valid then \xff\xfe invalid"); }},
      {"stop", [](auto& r) {
         for (int i = 0; i < 40; ++i) r.mutable_sampling()->add_stop("s" + std::to_string(i));
       }},
  };
  for (const Case& k : cases) {
    v1::GenerateRequest r = base();
    k.mutate(r);
    const Outcome o = Generate(c.stub(), r);
    EXPECT_EQ(o.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << k.field << ": " << o.status.error_message();
    EXPECT_NE(o.status.error_message().find(k.field), std::string::npos)
        << "message does not name " << k.field << ": " << o.status.error_message();
    // The server keeps serving.
    const Outcome good = Generate(c.stub(), base());
    ASSERT_TRUE(good.status.ok()) << good.status.error_message();
  }
  ExpectWorkersIdle(c);
}

TEST(ServingTest, OverloadGivesResourceExhaustedToTheExcessOnly) {
  Cluster c(1, 1, {"--max-running", "2", "--max-queued", "2"});
  ASSERT_TRUE(c.ok());
  Reference ref;
  constexpr int kN = 12;
  std::vector<Outcome> out(kN);
  std::vector<std::thread> threads;
  const auto prompt = Prompt(16, 3, ref.vocab());
  const auto want = ref.Tokens(prompt, 120);
  for (int i = 0; i < kN; ++i) {
    threads.emplace_back([&, i] { out[i] = Generate(c.stub(), Request(prompt, 120)); });
  }
  for (auto& t : threads) t.join();
  int ok = 0, exhausted = 0;
  for (const Outcome& o : out) {
    if (o.status.ok()) {
      ++ok;
      EXPECT_EQ(o.ids, want);
    } else {
      EXPECT_EQ(o.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
          << o.status.error_message();
      ++exhausted;
    }
  }
  EXPECT_GE(ok, 4);
  EXPECT_GE(exhausted, 1);
  EXPECT_EQ(ok + exhausted, kN);
  ExpectWorkersIdle(c);
}

TEST(ServingTest, SigtermDrainsInFlightRequests) {
  Cluster c(1, 1);
  ASSERT_TRUE(c.ok());
  Reference ref;
  const auto prompt = Prompt(12, 4, ref.vocab());
  Outcome o;
  std::atomic<bool> started{false};
  std::atomic<bool> finished{false};
  std::thread t([&] {
    grpc::ClientContext ctx;
    auto reader = c.stub().Generate(&ctx, Request(prompt, 3000));
    v1::GenerateResponse resp;
    while (reader->Read(&resp)) {
      started = true;
      o.ids.insert(o.ids.end(), resp.token_ids().begin(), resp.token_ids().end());
    }
    o.status = reader->Finish();
    finished = true;
  });
  while (!started) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  c.router().Signal(SIGTERM);
  // New work is refused while the old request finishes (the signal is handled asynchronously:
  // a request sent before the drain began may still be served).
  grpc::Status refused;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (refused.error_code() != grpc::StatusCode::UNAVAILABLE &&
         std::chrono::steady_clock::now() < deadline) {
    refused = Generate(c.stub(), Request(prompt, 1), std::chrono::seconds(5)).status;
  }
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_FALSE(finished.load()) << "the long request ended before the drain was observed";
  t.join();
  ASSERT_TRUE(o.status.ok()) << o.status.error_message();
  EXPECT_EQ(o.ids, ref.Tokens(prompt, 3000));
  EXPECT_EQ(c.router().Wait(std::chrono::seconds(10)), 0);
}

std::string BufferToString(const grpc::ByteBuffer& b) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (b.Dump(&slices).ok()) {
    for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return out;
}

// grpc.health.v1.Health/Check for the whole server ("" service), through a generic stub: the
// request is the empty message; SERVING is field 1 = 1 (bytes 08 01).
std::string HealthCheck(const std::string& addr) {
  grpc::GenericStub stub(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::Slice empty("");
  grpc::ByteBuffer req(&empty, 1), resp;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &req, &resp,
                 [&](grpc::Status s) { done.set_value(s); });
  const grpc::Status st = done.get_future().get();
  return st.ok() ? BufferToString(resp) : "error: " + st.error_message();
}

// Lists services through server reflection (ServerReflectionRequest.list_services = "": field 7,
// empty string); returns the raw response, which holds the service names.
std::string ReflectionList(const std::string& addr) {
  grpc::GenericStub stub(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::CompletionQueue cq;
  auto call =
      stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  void* tag = nullptr;
  bool ok = false;
  std::string out;
  call->StartCall(reinterpret_cast<void*>(1));
  if (cq.Next(&tag, &ok) && ok) {
    grpc::Slice s(std::string("\x3a\x00", 2));
    grpc::ByteBuffer req(&s, 1);
    call->Write(req, reinterpret_cast<void*>(2));
    cq.Next(&tag, &ok);
    grpc::ByteBuffer resp;
    call->Read(&resp, reinterpret_cast<void*>(3));
    if (cq.Next(&tag, &ok) && ok) out = BufferToString(resp);
    call->WritesDone(reinterpret_cast<void*>(4));
    cq.Next(&tag, &ok);
  }
  grpc::Status st;
  call->Finish(&st, reinterpret_cast<void*>(5));
  cq.Next(&tag, &ok);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  return out;
}

TEST(ServingTest, EveryProcessServesHealthReflectionAndLintedMetrics) {
  Cluster c(1, 1);
  ASSERT_TRUE(c.ok());
  const std::vector<std::pair<TandemProcess*, std::string>> procs = {
      {&c.router(), "tandem.v1.Tandem"},
      {&c.prefill(0), "tandem.internal.v1.PrefillWorker"},
      {&c.decode(0), "tandem.internal.v1.DecodeWorker"}};
  const bool have_promtool = std::system("command -v promtool >/dev/null 2>&1") == 0;
  for (const auto& [p, service] : procs) {
    const std::string addr = p->field("grpc");
    EXPECT_EQ(HealthCheck(addr), std::string("\x08\x01", 2)) << addr << " not SERVING";
    const std::string services = ReflectionList(addr);
    EXPECT_NE(services.find(service), std::string::npos) << addr;
    EXPECT_NE(services.find("grpc.health.v1.Health"), std::string::npos) << addr;
    const std::string metrics = p->field("metrics");
    ASSERT_FALSE(metrics.empty());
    if (have_promtool) {
      const std::string cmd = "curl -s --max-time 10 http://" + metrics +
                              "/metrics | promtool check metrics >/dev/null 2>&1";
      EXPECT_EQ(std::system(cmd.c_str()), 0) << "promtool check metrics failed for " << metrics;
    }
  }
}

TEST(ServingTest, YamlConfigIsReadAndFlagsWin) {
  const std::string dir = LogDir();
  const std::string cfg = dir + "/router.yaml";
  {
    std::ofstream f(cfg);
    f << "model: " << kModel << "\n"
      << "bind: 256.0.0.1        # invalid: the command line must win\n"
      << "grpc_port: 0\n"
      << "metrics_port: -1       # read from here: no metrics field on the ready line\n"
      << "max_queued: 7\n"
      << "decode_worker: [127.0.0.1:1]\n";
  }
  TandemProcess router({"router", "--config", cfg, "--bind", "127.0.0.1"}, dir + "/router.log");
  ASSERT_TRUE(router.WaitReady());
  EXPECT_FALSE(router.field("grpc").empty());
  EXPECT_TRUE(router.field("metrics").empty());

  // A bad file is refused with a message, not a crash.
  {
    std::ofstream f(dir + "/bad.yaml");
    f << "[not, a, map]\n";
  }
  TandemProcess bad({"router", "--config", dir + "/bad.yaml"}, dir + "/bad.log");
  EXPECT_FALSE(bad.WaitReady(std::chrono::seconds(20)));
  EXPECT_NE(bad.Wait(std::chrono::seconds(10)), 0);
}

}  // namespace
}  // namespace tandem
