// Both workers over real gRPC and the TCP data plane: the tokens a request gets disaggregated
// (prefill's first token, then the decode worker's) equal a local engine run, across KV layouts,
// sampling modes, re-admission and the local-prefill paths; every block comes back.
#include <gtest/gtest.h>

#include <thread>

#include "tests/workers/worker_test_util.h"

namespace tandem {
namespace {

using namespace testing_util;  // NOLINT(build/namespaces)

TEST(DisaggregatedTest, GreedyTokensMatchALocalEngineForConcurrentCalls) {
  const std::string dir = TestData("models/llama3_gqa_bf16");
  const auto pre = Options(dir, 16, DType::kF32);
  Cluster cluster({pre, Options(dir, 8, DType::kF32)});
  const int vocab = VocabSize(pre);
  std::vector<iv1::SequenceSpec> specs;
  for (int len : {1, 3, 16, 17, 40}) specs.push_back(Spec(Prompt(len, len, vocab), 10));
  std::vector<RunResult> results(specs.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < specs.size(); ++i) {
    threads.emplace_back([&, i] { results[i] = cluster.Run(specs[i]); });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < specs.size(); ++i) {
    SCOPED_TRACE("prompt length " + std::to_string(specs[i].prompt_ids_size()));
    EXPECT_TRUE(results[i].got_ticket);
    EXPECT_TRUE(results[i].prefill_status.ok()) << results[i].prefill_status.error_message();
    EXPECT_TRUE(results[i].decode_status.ok()) << results[i].decode_status.error_message();
    EXPECT_EQ(results[i].ids, LocalRun(pre, specs[i]));
  }
  cluster.ExpectIdle();
}

// The prefill side computes the prompt with its own KV dtype and block size and the decode side
// continues from the converted copy. Reference: a local engine with the decode side's KV
// settings. (On these fixtures every greedy step has a top-1/top-2 margin >= 0.05, well above
// what bf16 KV rounding moves a logit, so f32 and bf16 KV agree on the tokens.)
TEST(DisaggregatedTest, HeterogeneousKvLayoutsGiveTheSameGreedyTokens) {
  const std::string dir = TestData("models/llama3_gqa_bf16");
  struct Case {
    EngineOptions prefill, decode;
  };
  const Case cases[] = {
      {Options(dir, 16, DType::kF32), Options(dir, 4, DType::kBF16)},
      {Options(dir, 4, DType::kBF16), Options(dir, 16, DType::kF32)},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string("prefill ") + std::string(DTypeName(c.prefill.kv_dtype)) +
                 " -> decode " + std::string(DTypeName(c.decode.kv_dtype)));
    Cluster cluster({c.prefill, c.decode});
    const int vocab = VocabSize(c.prefill);
    for (int len : {5, 21}) {
      const auto spec = Spec(Prompt(len, 5, vocab), 8);
      const RunResult r = cluster.Run(spec);
      EXPECT_TRUE(r.got_ticket);
      EXPECT_TRUE(r.decode_status.ok()) << r.decode_status.error_message();
      EXPECT_EQ(r.ids, LocalRun(c.decode, spec)) << "prompt length " << len;
    }
    cluster.ExpectIdle();
  }
}

TEST(DisaggregatedTest, SeededSamplingMatchesALocalRun) {
  const auto o = Options(DemoModelDir(), 16, DType::kF32);
  Cluster cluster({o, o});
  const int vocab = VocabSize(o);
  for (uint64_t seed : {1234u, 99u}) {
    const auto spec = Spec(Prompt(12, static_cast<int>(seed), vocab), 12, seed);
    const RunResult r = cluster.Run(spec);
    EXPECT_TRUE(r.decode_status.ok()) << r.decode_status.error_message();
    EXPECT_EQ(r.ids, LocalRun(o, spec)) << "seed " << seed;
  }
  cluster.ExpectIdle();
}

TEST(DisaggregatedTest, ReadmissionContinuesWithTheRemainingLocalTokens) {
  const auto o = Options(DemoModelDir(), 16, DType::kF32);
  Cluster cluster({o, Options(DemoModelDir(), 8, DType::kF32)});
  const int vocab = VocabSize(o);
  for (std::optional<uint64_t> seed : {std::optional<uint64_t>(), std::optional<uint64_t>(7)}) {
    iv1::SequenceSpec spec = Spec(Prompt(20, 3, vocab), 12, seed);
    const std::vector<int32_t> local = LocalRun(o, spec);
    ASSERT_EQ(local.size(), 12u);
    // The first 5 tokens already reached the client before its decode worker died.
    for (int i = 0; i < 5; ++i) spec.add_output_ids(local[i]);
    const RunResult r = cluster.Run(spec);
    EXPECT_TRUE(r.got_ticket);
    EXPECT_TRUE(r.decode_status.ok()) << r.decode_status.error_message();
    EXPECT_EQ(r.ids, std::vector<int32_t>(local.begin() + 5, local.end()))
        << (seed ? "seeded" : "greedy");
  }
  cluster.ExpectIdle();
}

TEST(DisaggregatedTest, LocalPrefillWhenAsked) {
  const auto o = Options(TestData("models/qwen2_tied_bias_bf16"), 8, DType::kF32);
  Cluster cluster({o, o});
  const auto spec = Spec(Prompt(19, 2, VocabSize(o)), 9);
  const RunResult r = cluster.Run(spec, /*local_prefill=*/true);
  EXPECT_FALSE(r.got_ticket);
  EXPECT_TRUE(r.local_prefill);
  EXPECT_TRUE(r.decode_status.ok()) << r.decode_status.error_message();
  EXPECT_EQ(r.ids, LocalRun(o, spec));
  cluster.ExpectIdle();
}

// A call whose landing cannot be reserved right now (another call's reservation holds the
// pool) prefills locally instead; it waits for blocks inside the engine until the first call's
// KV lands and finishes, and both end with the local tokens.
TEST(DisaggregatedTest, FallsBackToLocalPrefillWhenThePoolIsShort) {
  const std::string dir = TestData("models/llama3_gqa_bf16");
  const auto pre = Options(dir, 16, DType::kF32);
  EngineOptions dec = Options(dir, 4, DType::kF32);
  dec.num_kv_blocks = 16;  // 64 tokens: one 40-token prompt reserves 10 blocks
  Cluster cluster({pre, dec});
  const int vocab = VocabSize(pre);
  const auto first = Spec(Prompt(40, 1, vocab), 8);
  const auto second = Spec(Prompt(40, 2, vocab), 8);

  DecodeStream a(cluster, first);
  ASSERT_TRUE(a.first.has_ticket());
  EXPECT_EQ(cluster.decode().free_blocks(), 6);
  // The reservation counts as running in the load snapshot (refreshed by the loop).
  EXPECT_TRUE(Eventually([&] { return cluster.decode().Load().running_sequences() == 1; }));
  DecodeStream b(cluster, second);
  EXPECT_FALSE(b.first.has_ticket());
  EXPECT_TRUE(b.first.local_prefill());

  // The first call's KV lands while the fallback waits in the engine for blocks.
  iv1::PrefillRequest preq;
  *preq.mutable_seq() = first;
  *preq.mutable_ticket() = a.first.ticket();
  grpc::ClientContext pctx;
  iv1::PrefillResponse presp;
  ASSERT_TRUE(cluster.prefill_stub().Prefill(&pctx, preq, &presp).ok());
  std::vector<int32_t> a_ids{presp.first().id()};
  const auto a_rest = a.ReadTokens(1);
  a_ids.insert(a_ids.end(), a_rest.begin(), a_rest.end());
  EXPECT_TRUE(a.Finish().ok());
  EXPECT_EQ(a_ids, LocalRun(pre, first));
  const auto b_ids = b.ReadTokens(0);
  const grpc::Status b_status = b.Finish();
  EXPECT_TRUE(b_status.ok()) << b_status.error_message();
  EXPECT_EQ(b_ids, LocalRun(pre, second));
  cluster.ExpectIdle();
}

TEST(DisaggregatedTest, GetInfoDescribesEachRole) {
  const std::string dir = TestData("models/llama3_gqa_bf16");
  const auto pre = Options(dir, 16, DType::kF32);
  const auto dec = Options(dir, 4, DType::kBF16);
  Cluster cluster({pre, dec});
  auto engine = Engine::Create(pre);
  ASSERT_TRUE(engine.ok());
  const uint64_t fingerprint = (*engine)->model().fingerprint;
  const auto& cfg = (*engine)->config();

  struct Want {
    iv1::Worker::Stub* stub;
    iv1::Role role;
    const EngineOptions* options;
    std::string grpc_address;
  };
  const Want wants[] = {
      {&cluster.prefill_info_stub(), iv1::ROLE_PREFILL, &pre, cluster.prefill_server().address()},
      {&cluster.decode_info_stub(), iv1::ROLE_DECODE, &dec, cluster.decode_server().address()},
  };
  uint64_t incarnations[2] = {0, 0};
  for (int i = 0; i < 2; ++i) {
    const Want& w = wants[i];
    grpc::ClientContext ctx;
    ctx.set_deadline(In(std::chrono::seconds(10)));
    iv1::GetInfoResponse resp;
    ASSERT_TRUE(w.stub->GetInfo(&ctx, iv1::GetInfoRequest(), &resp).ok());
    const iv1::WorkerInfo& info = resp.info();
    EXPECT_EQ(info.role(), w.role);
    EXPECT_EQ(info.model_fingerprint(), fingerprint);
    EXPECT_EQ(info.model_name(), "test-model");
    EXPECT_EQ(info.grpc_address(), w.grpc_address);
    EXPECT_EQ(info.name(), w.grpc_address);  // no name given
    EXPECT_EQ(info.backend(), "cpu");
    EXPECT_EQ(info.accelerator_vendor(), "cpu");
    EXPECT_NE(info.incarnation_id(), 0u);
    incarnations[i] = info.incarnation_id();
    EXPECT_EQ(info.kv_layout().num_layers(), cfg.num_layers);
    EXPECT_EQ(info.kv_layout().num_kv_heads(), cfg.num_kv_heads);
    EXPECT_EQ(info.kv_layout().head_dim(), cfg.head_dim);
    EXPECT_EQ(info.kv_layout().dtype(), std::string(DTypeName(w.options->kv_dtype)));
    EXPECT_EQ(info.kv_layout().block_size(), w.options->block_size);
    EXPECT_EQ(resp.load().total_kv_blocks(), 256);
    EXPECT_EQ(resp.load().free_kv_blocks(), 256);
    EXPECT_FALSE(resp.draining());
  }
  EXPECT_NE(incarnations[0], incarnations[1]);
  EXPECT_EQ(cluster.decode().Info().kv_address(),
            "127.0.0.1:" + std::to_string(cluster.decode().kv_port()));
  EXPECT_EQ(cluster.prefill().Info().kv_address(), "");
}

}  // namespace
}  // namespace tandem
