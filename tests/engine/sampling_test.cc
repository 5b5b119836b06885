// Sampling math: validation, greedy paths, filters, penalties, seeded draws, NaN safety.
#include "engine/sampling.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

namespace tandem {
namespace {

SampledToken Sample(std::vector<float> logits, const ResolvedSampling& p, Rng& rng,
                    int32_t logprobs = -1, const TokenHistory& h = TokenHistory()) {
  SamplerScratch scratch;
  return SampleToken(logits, p, h, {}, logprobs, rng, scratch);
}

TEST(SamplingValidationTest, NamesTheField) {
  SamplingParams p;
  EXPECT_TRUE(ValidateSamplingParams(p, 10).ok());
  p.temperature = std::numeric_limits<float>::infinity();
  EXPECT_NE(ValidateSamplingParams(p, 10).message().find("temperature"), std::string::npos);
  p = {};
  p.min_p = 2;
  EXPECT_NE(ValidateSamplingParams(p, 10).message().find("min_p"), std::string::npos);
  p = {};
  p.stop_token_ids = {10};
  EXPECT_NE(ValidateSamplingParams(p, 10).message().find("stop_token_ids"), std::string::npos);
  p = {};
  p.stop = std::vector<std::string>(17, "x");
  EXPECT_NE(ValidateSamplingParams(p, 10).message().find("stop"), std::string::npos);
  p = {};
  p.logprobs = 21;
  EXPECT_NE(ValidateSamplingParams(p, 10).message().find("logprobs"), std::string::npos);
  p = {};
  p.repetition_penalty = 0;
  EXPECT_NE(ValidateSamplingParams(p, 10).message().find("repetition_penalty"),
            std::string::npos);
}

TEST(SamplingDefaultsTest, GenerationConfigFillsUnsetFieldsOnly) {
  GenerationDefaults d;
  d.temperature = 0.7f;
  d.top_p = 0.9f;
  SamplingParams p;
  ResolvedSampling r = ResolveSampling(p, d);
  EXPECT_FLOAT_EQ(r.temperature, 0.7f);
  EXPECT_FLOAT_EQ(r.top_p, 0.9f);
  p.temperature = 0;
  r = ResolveSampling(p, d);
  EXPECT_TRUE(r.greedy);
  p.temperature = 1e-7f;  // tiny temperatures take the greedy path
  EXPECT_TRUE(ResolveSampling(p, d).greedy);
}

TEST(SamplingTest, GreedyAndDegenerateFiltersPickTheArgmax) {
  Rng rng(1);
  ResolvedSampling greedy;
  greedy.greedy = true;
  EXPECT_EQ(Sample({0.1f, 3.0f, 2.9f}, greedy, rng).token, 1);
  ResolvedSampling topk1;
  topk1.top_k = 1;
  ResolvedSampling tiny_p;
  tiny_p.top_p = 1e-6f;
  ResolvedSampling minp1;
  minp1.min_p = 1.0f;
  for (int i = 0; i < 50; ++i) {
    EXPECT_EQ(Sample({0.1f, 3.0f, 2.9f, -1.0f}, topk1, rng).token, 1);
    EXPECT_EQ(Sample({0.1f, 3.0f, 2.9f, -1.0f}, tiny_p, rng).token, 1);
    EXPECT_EQ(Sample({0.1f, 3.0f, 2.9f, -1.0f}, minp1, rng).token, 1);
  }
}

TEST(SamplingTest, DrawsFollowTheDistribution) {
  Rng rng(7);
  ResolvedSampling p;
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  std::vector<int> counts(3);
  const int n = 20000;
  for (int i = 0; i < n; ++i) ++counts[Sample(logits, p, rng).token];
  EXPECT_NEAR(counts[0] / double(n), 0.5, 0.02);
  EXPECT_NEAR(counts[1] / double(n), 0.3, 0.02);
  EXPECT_NEAR(counts[2] / double(n), 0.2, 0.02);
  // top_p 0.7 keeps {0, 1} renormalised: 0.5/0.8 and 0.3/0.8.
  p.top_p = 0.7f;
  counts.assign(3, 0);
  for (int i = 0; i < n; ++i) ++counts[Sample(logits, p, rng).token];
  EXPECT_EQ(counts[2], 0);
  EXPECT_NEAR(counts[0] / double(n), 0.625, 0.02);
}

TEST(SamplingTest, SameSeedSameDraws) {
  ResolvedSampling p;
  const std::vector<float> logits = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f};
  Rng a(42), b(42);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(Sample(logits, p, a).token, Sample(logits, p, b).token);
}

TEST(SamplingTest, PenaltiesMoveProbabilityAway) {
  Rng rng(3);
  ResolvedSampling p;
  p.greedy = true;
  p.repetition_penalty = 10.0f;
  TokenHistory h;
  h.AddPrompt(std::vector<int32_t>{1});
  EXPECT_EQ(Sample({0.0f, 3.0f, 2.0f}, p, rng, -1, h).token, 2);
  ResolvedSampling q;
  q.greedy = true;
  q.frequency_penalty = 0.6f;
  TokenHistory h2;
  h2.AddOutput(1);
  h2.AddOutput(1);
  EXPECT_EQ(Sample({0.0f, 3.0f, 2.0f}, q, rng, -1, h2).token, 2);  // 3 - 1.2 < 2
}

TEST(SamplingTest, NanLogitsNeverWin) {
  Rng rng(5);
  ResolvedSampling p;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int i = 0; i < 200; ++i) {
    const int t = Sample({nan, 1.0f, nan, 0.5f}, p, rng).token;
    EXPECT_TRUE(t == 1 || t == 3);
  }
  ResolvedSampling g;
  g.greedy = true;
  EXPECT_EQ(Sample({nan, 1.0f, nan}, g, rng).token, 1);
}

TEST(SamplingTest, LogprobsAreOfTheRawDistribution) {
  Rng rng(9);
  ResolvedSampling p;
  p.greedy = true;
  p.repetition_penalty = 2.0f;
  const std::vector<float> logits = {1.0f, 2.0f, 3.0f};
  auto t = Sample(logits, p, rng, 2);
  const double z = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
  EXPECT_EQ(t.token, 2);
  EXPECT_NEAR(t.logprob, 3.0 - std::log(z), 1e-5);
  ASSERT_EQ(t.top_logprobs.size(), 2u);
  EXPECT_EQ(t.top_logprobs[0].first, 2);
  EXPECT_EQ(t.top_logprobs[1].first, 1);
  EXPECT_NEAR(t.top_logprobs[1].second, 2.0 - std::log(z), 1e-5);
}

// PickGreedy is what a GPU backend returns instead of a row: it must agree with SampleToken
// exactly wherever PickSuffices says it may replace it.
TEST(SamplingTest, PickGreedyEqualsGreedySampling) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<std::vector<float>> rows = {
      {0.5f, 2.0f, -1.0f, 2.0f},  // tie: the first index wins
      {-inf, -inf, -inf},         // nothing finite: token 0
      {nan, 1.0f, nan, 0.5f},     // NaN never wins
      {3.0f},
  };
  Rng gen(7);
  for (int r = 0; r < 20; ++r) {
    std::vector<float> row(1000);
    for (float& v : row) v = static_cast<float>(gen.Uniform() * 40.0 - 20.0);
    rows.push_back(row);
  }
  ResolvedSampling greedy;
  greedy.greedy = true;
  ASSERT_TRUE(PickSuffices(greedy, false, 0));
  EXPECT_TRUE(PickSuffices(greedy, false, -1));
  EXPECT_FALSE(PickSuffices(greedy, true, 0));
  EXPECT_FALSE(PickSuffices(greedy, false, 3));
  ResolvedSampling penalised = greedy;
  penalised.repetition_penalty = 1.1f;
  EXPECT_FALSE(PickSuffices(penalised, false, 0));
  ResolvedSampling sampled;
  EXPECT_FALSE(PickSuffices(sampled, false, 0));
  TokenHistory history;
  SamplerScratch scratch;
  Rng rng(1);
  for (const auto& row : rows) {
    std::vector<float> work = row;
    const SampledToken want = SampleToken(work, greedy, history, {}, 0, rng, scratch);
    const TokenPick got = PickGreedy(row);
    EXPECT_EQ(got.token, want.token);
    if (std::isnan(want.logprob)) {
      EXPECT_TRUE(std::isnan(got.logprob));
    } else {
      EXPECT_EQ(got.logprob, want.logprob);
    }
  }
}

}  // namespace
}  // namespace tandem
