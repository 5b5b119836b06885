// Scheduling invariants of the step API: batch invariance, chunked prefill, preemption, prefix
// cache, cancellation, and exact KV accounting after every scenario.
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "engine/engine.h"
#include "tests/engine/test_util.h"

namespace tandem {
namespace {

using testing_util::DemoModelDir;
using testing_util::TestData;

EngineOptions Options(const std::string& dir) {
  EngineOptions o;
  o.model_dir = dir;
  o.num_kv_blocks = 512;
  o.block_size = 16;
  o.num_threads = 2;
  return o;
}

std::vector<int32_t> Prompt(int len, int salt, int vocab) {
  std::vector<int32_t> p;
  for (int i = 0; i < len; ++i) p.push_back((i * 37 + salt * 101 + 5) % vocab);
  return p;
}

SequenceRequest Greedy(std::vector<int32_t> prompt, int max_tokens) {
  SequenceRequest r;
  r.prompt_ids = std::move(prompt);
  r.sampling.temperature = 0.0f;
  r.sampling.ignore_eos = true;
  r.sampling.max_tokens = max_tokens;
  return r;
}

// Runs all requests together; returns each one's output ids.
std::vector<std::vector<int32_t>> RunTogether(Engine& e, const std::vector<SequenceRequest>& reqs) {
  std::map<SeqId, size_t> index;
  for (size_t i = 0; i < reqs.size(); ++i) {
    auto id = e.Add(reqs[i]);
    EXPECT_TRUE(id.ok()) << id.status();
    index[*id] = i;
  }
  std::vector<std::vector<int32_t>> out(reqs.size());
  while (e.HasWork()) {
    auto events = e.Step();
    EXPECT_TRUE(events.ok()) << events.status();
    if (!events.ok()) break;
    for (const TokenEvent& ev : *events) out[index[ev.seq]].push_back(ev.token);
  }
  return out;
}

void ExpectPoolIdle(Engine& e) {
  EXPECT_EQ(e.pool().num_free_blocks(), e.pool().num_blocks());
  EXPECT_EQ(e.pool().CheckInvariants(), "");
}

class EngineBatchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = TestData("models/llama3_gqa_bf16");
    for (int i = 0; i < 8; ++i) {
      reqs_.push_back(Greedy(Prompt(1 + i * 9, i, 1024), 12 + i));
    }
    auto solo = Engine::Create(Options(dir_));
    ASSERT_TRUE(solo.ok()) << solo.status();
    for (const auto& r : reqs_) {
      auto g = (*solo)->Generate(r);
      ASSERT_TRUE(g.ok()) << g.status();
      alone_.push_back(g->output_ids);
    }
    ExpectPoolIdle(**solo);
  }

  std::string dir_;
  std::vector<SequenceRequest> reqs_;
  std::vector<std::vector<int32_t>> alone_;
};

TEST_F(EngineBatchTest, MixedBatchOfEightGivesTheSameTokensAsAlone) {
  auto e = Engine::Create(Options(dir_));
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(RunTogether(**e, reqs_), alone_);
  ExpectPoolIdle(**e);
}

TEST_F(EngineBatchTest, ChunkedPrefillGivesTheSameTokens) {
  EngineOptions o = Options(dir_);
  o.max_batch_tokens = 7;
  auto e = Engine::Create(o);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(RunTogether(**e, reqs_), alone_);
  ExpectPoolIdle(**e);
}

TEST_F(EngineBatchTest, PreemptionUnderATinyPoolGivesTheSameTokens) {
  EngineOptions o = Options(dir_);
  o.block_size = 4;
  o.num_kv_blocks = 24;  // the longest request needs 21 blocks alone
  o.enable_prefix_cache = false;
  auto e = Engine::Create(o);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(RunTogether(**e, reqs_), alone_);
  ExpectPoolIdle(**e);
}

TEST_F(EngineBatchTest, BlockSizesOneAndSixtyFourAgreeWithSixteen) {
  for (int bs : {1, 64}) {
    EngineOptions o = Options(dir_);
    o.block_size = bs;
    auto e = Engine::Create(o);
    ASSERT_TRUE(e.ok());
    EXPECT_EQ(RunTogether(**e, reqs_), alone_) << "block size " << bs;
    ExpectPoolIdle(**e);
  }
}

TEST(EnginePrefixCacheTest, HitGivesTheSameLogitsAsAColdRun) {
  const std::string dir = TestData("models/qwen2_tied_bias_bf16");
  SequenceRequest req = Greedy(Prompt(70, 3, 768), 4);
  req.want_prompt_logits = true;

  EngineOptions cold_opts = Options(dir);
  cold_opts.enable_prefix_cache = false;
  auto cold = Engine::Create(cold_opts);
  ASSERT_TRUE(cold.ok());
  auto a = (*cold)->Generate(req);
  ASSERT_TRUE(a.ok());

  auto warm = Engine::Create(Options(dir));
  ASSERT_TRUE(warm.ok());
  auto b1 = (*warm)->Generate(req);
  ASSERT_TRUE(b1.ok());
  const int64_t hits_before = (*warm)->pool().Stats().prefix_hits;
  auto b2 = (*warm)->Generate(req);
  ASSERT_TRUE(b2.ok());
  EXPECT_EQ((*warm)->pool().Stats().prefix_hits - hits_before, 4);  // 69 tokens: 4 full blocks
  EXPECT_EQ(a->prompt_logits, b1->prompt_logits);
  EXPECT_EQ(a->prompt_logits, b2->prompt_logits);  // bit-exact
  EXPECT_EQ(a->output_ids, b2->output_ids);
  ExpectPoolIdle(**warm);
  ExpectPoolIdle(**cold);
}

TEST(EngineSamplingTest, SeededSamplingIsReproducibleAloneAndInABatch) {
  const std::string dir = TestData("models/llama2_mha_f16");
  auto e = Engine::Create(Options(dir));
  ASSERT_TRUE(e.ok());
  SequenceRequest r;
  r.prompt_ids = Prompt(10, 1, 512);
  r.sampling.temperature = 0.9f;
  r.sampling.top_p = 0.9f;
  r.sampling.top_k = 50;
  r.sampling.seed = 1234;
  r.sampling.max_tokens = 20;
  r.sampling.ignore_eos = true;
  auto first = (*e)->Generate(r);
  auto second = (*e)->Generate(r);
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_EQ(first->output_ids, second->output_ids);
  std::vector<SequenceRequest> batch = {Greedy(Prompt(30, 2, 512), 5), r,
                                        Greedy(Prompt(3, 4, 512), 25)};
  auto together = RunTogether(**e, batch);
  EXPECT_EQ(together[1], first->output_ids);
  r.sampling.seed = 99;
  auto other = (*e)->Generate(r);
  ASSERT_TRUE(other.ok());
  EXPECT_NE(other->output_ids, first->output_ids);
  ExpectPoolIdle(**e);
}

TEST(EngineValidationTest, BadRequestsFailAloneWithAFieldName) {
  auto e = Engine::Create(Options(TestData("models/llama2_mha_f16")));
  ASSERT_TRUE(e.ok());
  auto expect_invalid = [&](SequenceRequest r, const std::string& field) {
    auto id = (*e)->Add(std::move(r));
    ASSERT_FALSE(id.ok());
    EXPECT_EQ(id.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(id.status().message()).find(field), std::string::npos)
        << id.status();
  };
  expect_invalid(Greedy({}, 4), "prompt");
  expect_invalid(Greedy({1, 2, 512}, 4), "prompt");
  expect_invalid(Greedy({1, -3}, 4), "prompt");
  expect_invalid(Greedy(Prompt(4096, 1, 512), 4), "prompt");
  expect_invalid(Greedy(Prompt(4000, 1, 512), 200), "max_tokens");
  expect_invalid(Greedy({1, 2}, 0), "max_tokens");
  SequenceRequest r = Greedy({1, 2}, 4);
  r.sampling.temperature = std::nanf("");
  expect_invalid(r, "temperature");
  r = Greedy({1, 2}, 4);
  r.sampling.temperature = -1;
  expect_invalid(r, "temperature");
  r = Greedy({1, 2}, 4);
  r.sampling.top_p = 0;
  expect_invalid(r, "top_p");
  r.sampling.top_p = 1.5f;
  expect_invalid(r, "top_p");
  r = Greedy({1, 2}, 4);
  r.sampling.top_k = -2;
  expect_invalid(r, "top_k");
  r = Greedy({1, 2}, 4);
  r.sampling.stop = {"x"};  // no tokenizer in this folder
  expect_invalid(r, "stop");
  // The engine still serves.
  auto ok = (*e)->Generate(Greedy({1, 2, 3}, 3));
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(ok->output_ids.size(), 3u);
  ExpectPoolIdle(**e);
}

TEST(EngineValidationTest, KvMemoryFractionIsForGpuBackendsAndInRange) {
  EngineOptions o = Options(TestData("models/llama2_mha_f16"));
  o.num_kv_blocks = 0;
  o.kv_memory_fraction = 0.5;
  auto cpu = Engine::Create(o);
  ASSERT_FALSE(cpu.ok());
  EXPECT_EQ(cpu.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(cpu.status().message()).find("kv-cache-mb"), std::string::npos)
      << cpu.status();
  for (double bad : {-0.1, 1.5, std::nan("")}) {
    o.kv_memory_fraction = bad;
    auto e = Engine::Create(o);
    ASSERT_FALSE(e.ok()) << bad;
    EXPECT_NE(std::string(e.status().message()).find("kv_memory_fraction"), std::string::npos)
        << e.status();
  }
}

TEST(EngineLifecycleTest, AbortMidStreamFreesEveryBlock) {
  auto e = Engine::Create(Options(TestData("models/mistral_gqa_headdim_f32")));
  ASSERT_TRUE(e.ok());
  auto a = (*e)->Add(Greedy(Prompt(40, 1, 640), 50));
  auto b = (*e)->Add(Greedy(Prompt(20, 2, 640), 50));
  ASSERT_TRUE(a.ok() && b.ok());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE((*e)->Step().ok());
  EXPECT_LT((*e)->pool().num_free_blocks(), (*e)->pool().num_blocks());
  (*e)->Abort(*a);
  (*e)->Abort(*b);
  (*e)->Abort(12345);  // unknown: ignored
  EXPECT_FALSE((*e)->HasWork());
  ExpectPoolIdle(**e);
}

TEST(EngineStopTest, StopStringsStopIdsAndMaxTokens) {
  auto e = Engine::Create(Options(DemoModelDir()));
  ASSERT_TRUE(e.ok());
  const Tokenizer* tok = (*e)->tokenizer();
  ASSERT_NE(tok, nullptr);
  auto ids = tok->Encode("The President said that", true);
  ASSERT_TRUE(ids.ok());
  auto base = (*e)->Generate(Greedy(*ids, 16));
  ASSERT_TRUE(base.ok());
  EXPECT_EQ(base->finish, FinishReason::kLength);
  // Full decode and streamed text agree.
  auto full = tok->Decode(base->output_ids, true);
  ASSERT_TRUE(full.ok());
  EXPECT_EQ(base->text, *full);

  // A stop string taken from the middle of the greedy text cuts the text before it.
  const std::string stop = "United";
  const size_t at = base->text.find(stop);
  ASSERT_NE(at, std::string::npos) << base->text;
  SequenceRequest r = Greedy(*ids, 16);
  r.sampling.stop = {stop, "zzzz-never"};
  auto cut = (*e)->Generate(r);
  ASSERT_TRUE(cut.ok());
  EXPECT_EQ(cut->finish, FinishReason::kStop);
  EXPECT_EQ(cut->text, base->text.substr(0, at));

  // A stop token id ends the sequence with that token.
  r = Greedy(*ids, 16);
  r.sampling.stop_token_ids = {base->output_ids[3]};
  auto by_id = (*e)->Generate(r);
  ASSERT_TRUE(by_id.ok());
  EXPECT_EQ(by_id->finish, FinishReason::kStop);
  EXPECT_EQ(by_id->output_ids.back(), base->output_ids[3]);
  EXPECT_LE(by_id->output_ids.size(), 4u);
  ExpectPoolIdle(**e);
}

}  // namespace
}  // namespace tandem
