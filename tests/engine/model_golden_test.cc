// The CPU engine against goldens made by Hugging Face transformers (fp32 compute): last prompt
// position logits within 1e-3 of max |ref|, greedy continuations exact.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "engine/engine.h"
#include "tests/engine/test_util.h"

namespace tandem {
namespace {

using testing_util::DemoModelDir;
using testing_util::ReadJson;
using testing_util::TestData;

struct GoldenModel {
  std::string name;
  std::string dir;
};

void PrintTo(const GoldenModel& m, std::ostream* os) { *os << m.name; }

class ModelGoldenTest : public ::testing::TestWithParam<GoldenModel> {};

void CheckGoldens(const std::string& dir, int block_size, DType kv_dtype, double tolerance) {
  EngineOptions opts;
  opts.model_dir = dir;
  opts.block_size = block_size;
  opts.kv_dtype = kv_dtype;
  opts.num_kv_blocks = std::max(64, 4096 / block_size);
  opts.num_threads = 2;
  auto engine = Engine::Create(opts);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const auto golden = ReadJson(dir + "/golden.json");
  ASSERT_FALSE(golden["cases"].empty());
  for (const auto& c : golden["cases"]) {
    SequenceRequest req;
    req.prompt_ids = c["input_ids"].get<std::vector<int32_t>>();
    const auto want_ids = c["greedy_ids"].get<std::vector<int32_t>>();
    const auto want_logits = c["last_logits"].get<std::vector<float>>();
    req.sampling.temperature = 0.0f;
    req.sampling.ignore_eos = true;
    req.sampling.max_tokens = static_cast<int32_t>(want_ids.size());
    req.want_prompt_logits = true;
    auto r = (*engine)->Generate(req);
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->prompt_logits.size(), want_logits.size());
    double max_diff = 0;
    double max_ref = 0;
    for (size_t i = 0; i < want_logits.size(); ++i) {
      max_diff = std::max(max_diff, std::fabs(double{r->prompt_logits[i]} - want_logits[i]));
      max_ref = std::max(max_ref, std::fabs(double{want_logits[i]}));
    }
    EXPECT_LE(max_diff / max_ref, tolerance) << "prompt of " << req.prompt_ids.size() << " tokens";
    EXPECT_EQ(r->output_ids, want_ids);
  }
  EXPECT_EQ((*engine)->pool().num_free_blocks(), (*engine)->pool().num_blocks());
  EXPECT_EQ((*engine)->pool().CheckInvariants(), "");
}

TEST_P(ModelGoldenTest, LogitsAndGreedyMatchReference) {
  CheckGoldens(GetParam().dir, 16, DType::kF32, 1e-3);
}

TEST_P(ModelGoldenTest, SameGreedyTokensWithBlockSizeOneAndSixtyFour) {
  CheckGoldens(GetParam().dir, 1, DType::kF32, 1e-3);
  CheckGoldens(GetParam().dir, 64, DType::kF32, 1e-3);
}

INSTANTIATE_TEST_SUITE_P(
    Fixtures, ModelGoldenTest,
    ::testing::Values(GoldenModel{"llama3_gqa_bf16", TestData("models/llama3_gqa_bf16")},
                      GoldenModel{"qwen2_tied_bias_bf16", TestData("models/qwen2_tied_bias_bf16")},
                      GoldenModel{"llama2_mha_f16", TestData("models/llama2_mha_f16")},
                      GoldenModel{"mistral_gqa_headdim_f32",
                                  TestData("models/mistral_gqa_headdim_f32")},
                      GoldenModel{"demo_model", DemoModelDir()}),
    [](const auto& info) { return info.param.name; });

TEST(DemoModelGoldenTest, TokenizerReproducesGoldenPromptIdsAndText) {
  EngineOptions opts;
  opts.model_dir = DemoModelDir();
  opts.num_kv_blocks = 64;
  opts.num_threads = 2;
  auto engine = Engine::Create(opts);
  ASSERT_TRUE(engine.ok()) << engine.status();
  ASSERT_NE((*engine)->tokenizer(), nullptr);
  const auto golden = ReadJson(DemoModelDir() + "/golden.json");
  for (const auto& c : golden["cases"]) {
    auto ids = (*engine)->tokenizer()->Encode(c["text"].get<std::string>(), true);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, c["input_ids"].get<std::vector<int32_t>>());
    SequenceRequest req;
    req.prompt_ids = *ids;
    req.sampling.temperature = 0.0f;
    req.sampling.ignore_eos = true;
    req.sampling.max_tokens = static_cast<int32_t>(c["greedy_ids"].size());
    auto r = (*engine)->Generate(req);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->output_ids, c["greedy_ids"].get<std::vector<int32_t>>());
    if (c.contains("greedy_text")) {
      EXPECT_EQ(r->text, c["greedy_text"].get<std::string>());
    }
  }
}

}  // namespace
}  // namespace tandem
