// The engine's half of disaggregation: a prefill-only sequence streams its KV layer by layer
// through a KvSender into another engine's landing, which continues the sequence. Tokens must
// equal a local run whatever the two sides' block sizes, KV dtypes and prefill chunking.
#include <gtest/gtest.h>

#include <optional>

#include "engine/engine.h"
#include "kvcache/kv_in_process.h"
#include "kvcache/kv_landing.h"
#include "tests/engine/disagg_pair.h"
#include "tests/engine/test_util.h"

namespace tandem {
namespace {

using testing_util::DemoModelDir;
using testing_util::ExpectAllFree;
using testing_util::Local;
using testing_util::Options;
using testing_util::Pair;
using testing_util::Prompt;
using testing_util::Request;
using testing_util::TestData;

TEST(EngineDisaggTest, GreedyTokensMatchALocalRunAcrossLayouts) {
  const std::string dir = TestData("models/llama3_gqa_bf16");
  const auto pre = Options(dir, 16, DType::kF32);
  const auto dec = Options(dir, 4, DType::kF32);
  Pair pair(pre, dec);
  const int vocab = pair.prefill().config().vocab_size;
  for (int len : {1, 3, 16, 17, 40}) {
    const auto r = Request(Prompt(len, len, vocab), 10);
    EXPECT_EQ(pair.Run(r), Local(pre, r)) << "prompt length " << len;
  }
  ExpectAllFree(pair.prefill());
  ExpectAllFree(pair.decode());
}

TEST(EngineDisaggTest, ChunkedPrefillAndPrefixHitsExportEveryToken) {
  const std::string dir = TestData("models/qwen2_tied_bias_bf16");
  auto pre = Options(dir, 8, DType::kF32);
  pre.max_batch_tokens = 5;  // a 30-token prompt takes six steps
  Pair pair(pre, Options(dir, 16, DType::kF32));
  const int vocab = pair.prefill().config().vocab_size;
  const auto r = Request(Prompt(30, 1, vocab), 6);
  const auto want = Local(Options(dir, 16, DType::kF32), r);
  EXPECT_EQ(pair.Run(r), want);
  // Same prompt again: three full blocks come from the prefix cache, and must still be sent.
  EXPECT_EQ(pair.Run(r), want);
  EXPECT_GT(pair.prefill().pool().Stats().prefix_hits, 0);
  ExpectAllFree(pair.prefill());
  ExpectAllFree(pair.decode());
}

TEST(EngineDisaggTest, DifferentKvDtypesOnEachSide) {
  const std::string dir = TestData("models/llama3_gqa_bf16");
  // bf16 KV rounds differently from f32; compare against a local run that uses the decode
  // side's KV dtype for the decode positions and the same on prefill (bf16 both ways here).
  const auto pre = Options(dir, 16, DType::kBF16);
  Pair pair(pre, Options(dir, 4, DType::kBF16));
  const int vocab = pair.prefill().config().vocab_size;
  const auto r = Request(Prompt(21, 5, vocab), 8);
  EXPECT_EQ(pair.Run(r), Local(pre, r));
  Pair mixed(Options(dir, 16, DType::kF32), Options(dir, 8, DType::kF16));
  const auto mixed_out = mixed.Run(r);
  EXPECT_EQ(mixed_out.size(), 8u);
  ExpectAllFree(mixed.decode());
}

TEST(EngineDisaggTest, SeededSamplingAndReadmissionContinueTheLocalSequence) {
  const std::string dir = DemoModelDir();
  const auto o = Options(dir, 16, DType::kF32);
  Pair pair(o, o);
  const int vocab = pair.prefill().config().vocab_size;
  const auto r = Request(Prompt(12, 9, vocab), 12, /*seed=*/1234);
  const auto local = Local(o, r);
  EXPECT_EQ(pair.Run(r), local);
  // Re-admission after 5 tokens were sent: the rest continues exactly.
  SequenceRequest again = r;
  again.output_ids.assign(local.begin(), local.begin() + 5);
  const auto rest = pair.Run(again);
  EXPECT_EQ(rest, std::vector<int32_t>(local.begin() + 5, local.end()));
  ExpectAllFree(pair.decode());
}

TEST(EngineDisaggTest, AFailedExportFailsTheSequenceAloneAndFreesIt) {
  const std::string dir = TestData("models/llama3_gqa_bf16");
  const auto o = Options(dir, 16, DType::kF32);
  Pair pair(o, o);
  Engine& p = pair.prefill();
  // A transfer the landing never expected: the first LAYER fails it.
  KvLanding other(pair.decode().pool(), pair.decode().backend().kv_store());
  InProcessKvSender sender(other);
  OutgoingTransferSpec spec;
  spec.transfer_id = 99;
  spec.model_fingerprint = p.model().fingerprint;
  spec.geometry = p.backend().kv_store().layout().geometry;
  spec.dtype = DType::kF32;
  const auto prompt = Prompt(20, 2, p.config().vocab_size);
  spec.token_count = static_cast<int64_t>(prompt.size());
  auto t = sender.Begin(spec, [](const TransferAck&) {});
  ASSERT_TRUE(t.ok());
  SequenceRequest bad = Request(prompt, 4);
  bad.prefill_only = true;
  bad.kv_export = t->get();
  const SeqId bad_id = *p.Add(bad);
  const SeqId good_id = *p.Add(Request(prompt, 4));
  bool bad_failed = false;
  int good_tokens = 0;
  while (p.HasWork()) {
    auto evs = p.Step();
    ASSERT_TRUE(evs.ok());
    for (auto& ev : *evs) {
      if (ev.seq == bad_id) {
        EXPECT_FALSE(ev.status.ok());
        EXPECT_EQ(ev.finish, FinishReason::kAbort);
        bad_failed = true;
      } else if (ev.seq == good_id) {
        ++good_tokens;
      }
    }
  }
  EXPECT_TRUE(bad_failed);
  EXPECT_EQ(good_tokens, 4);
  ExpectAllFree(p);
}

}  // namespace
}  // namespace tandem
