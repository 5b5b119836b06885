// The engine's half of disaggregation: a prefill-only sequence streams its KV layer by layer
// through a KvSender into another engine's landing, which continues the sequence. Tokens must
// equal a local run whatever the two sides' block sizes, KV dtypes and prefill chunking.
#include <gtest/gtest.h>

#include <optional>

#include "engine/engine.h"
#include "kvcache/kv_in_process.h"
#include "kvcache/kv_landing.h"
#include "tests/engine/test_util.h"

namespace tandem {
namespace {

using testing_util::DemoModelDir;
using testing_util::TestData;

EngineOptions Options(const std::string& dir, int32_t block_size, DType dtype) {
  EngineOptions o;
  o.model_dir = dir;
  o.num_kv_blocks = 256;
  o.block_size = block_size;
  o.kv_dtype = dtype;
  o.num_threads = 2;
  return o;
}

SequenceRequest Request(std::vector<int32_t> prompt, int max_tokens,
                        std::optional<uint64_t> seed = std::nullopt) {
  SequenceRequest r;
  r.prompt_ids = std::move(prompt);
  r.sampling.temperature = seed ? 0.8f : 0.0f;
  r.sampling.seed = seed;
  r.sampling.ignore_eos = true;
  r.sampling.max_tokens = max_tokens;
  return r;
}

std::vector<int32_t> Prompt(int len, int salt, int vocab) {
  std::vector<int32_t> p;
  for (int i = 0; i < len; ++i) p.push_back((i * 53 + salt * 97 + 3) % vocab);
  return p;
}

// A prefill engine and a decode engine joined by an in-process data plane.
class Pair {
 public:
  Pair(const EngineOptions& prefill, const EngineOptions& decode) {
    p_ = *Engine::Create(prefill);
    d_ = *Engine::Create(decode);
    landing_ = std::make_unique<KvLanding>(d_->pool(), d_->backend().kv_store());
    sender_ = std::make_unique<InProcessKvSender>(*landing_);
  }
  ~Pair() {
    sender_.reset();
    landing_.reset();
  }

  // Runs `r` disaggregated; returns output ids (prefill's first token, then the decode side's).
  std::vector<int32_t> Run(const SequenceRequest& r) {
    const int64_t n = static_cast<int64_t>(r.prompt_ids.size() + r.output_ids.size());
    const int32_t bs = d_->pool().block_size();
    auto blocks = d_->pool().Allocate(static_cast<int32_t>((n + bs - 1) / bs));
    EXPECT_TRUE(blocks.ok());
    std::optional<LandingOutcome> landed;
    ExpectedTransfer e;
    e.transfer_id = ++next_id_;
    e.token[0] = 7;
    e.model_fingerprint = d_->model().fingerprint;
    e.geometry = d_->backend().kv_store().layout().geometry;
    e.token_count = n;
    e.block_table = *blocks;
    e.deadline = KvClock::now() + std::chrono::seconds(60);
    e.on_done = [&](const LandingOutcome& o) { landed = o; };
    EXPECT_TRUE(landing_->ExpectTransfer(e).ok());

    OutgoingTransferSpec spec;
    spec.transfer_id = e.transfer_id;
    spec.token = e.token;
    spec.model_fingerprint = p_->model().fingerprint;
    spec.geometry = e.geometry;
    spec.dtype = p_->backend().kv_store().layout().dtype;
    spec.token_count = n;
    std::optional<TransferAck> ack;
    auto t = sender_->Begin(spec, [&](const TransferAck& a) { ack = a; });
    EXPECT_TRUE(t.ok());
    SequenceRequest pr = r;
    pr.prefill_only = true;
    pr.kv_export = t->get();
    auto pid = p_->Add(pr);
    EXPECT_TRUE(pid.ok()) << pid.status();
    std::optional<TokenEvent> first;
    while (!first) {
      auto evs = p_->Step();
      EXPECT_TRUE(evs.ok());
      for (auto& ev : *evs) {
        if (ev.seq == *pid) first = ev;
      }
    }
    EXPECT_TRUE(first->status.ok()) << first->status;
    EXPECT_EQ(first->index, static_cast<int32_t>(r.output_ids.size()));
    EXPECT_TRUE((*t)->Finish(first->token, first->logprob).ok());
    EXPECT_TRUE(landed.has_value());
    EXPECT_TRUE(landed->status.ok()) << landed->status;
    EXPECT_TRUE(ack && ack->status.ok());
    EXPECT_FALSE(p_->HasWork());

    std::vector<int32_t> out{first->token};
    auto did = d_->AddPrefilled(r, *blocks, first->token, first->logprob);
    EXPECT_TRUE(did.ok()) << did.status();
    bool done = false;
    while (!done) {
      auto evs = d_->Step();
      EXPECT_TRUE(evs.ok());
      for (auto& ev : *evs) {
        if (ev.seq != *did) continue;
        if (ev.index == first->index) {
          EXPECT_EQ(ev.token, first->token);  // the first token, as received in END
        } else {
          out.push_back(ev.token);
        }
        done = ev.finish != FinishReason::kNone;
      }
    }
    return out;
  }

  Engine& prefill() { return *p_; }
  Engine& decode() { return *d_; }

 private:
  std::unique_ptr<Engine> p_, d_;
  std::unique_ptr<KvLanding> landing_;
  std::unique_ptr<InProcessKvSender> sender_;
  uint64_t next_id_ = 0;
};

std::vector<int32_t> Local(const EngineOptions& o, const SequenceRequest& r) {
  auto e = *Engine::Create(o);
  auto res = e->Generate(r);
  EXPECT_TRUE(res.ok());
  return res->output_ids;
}

void ExpectAllFree(Engine& e) {
  EXPECT_EQ(e.pool().num_free_blocks(), e.pool().num_blocks());
  EXPECT_EQ(e.pool().CheckInvariants(), "");
}

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
