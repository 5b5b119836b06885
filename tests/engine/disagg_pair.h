// A prefill engine and a decode engine joined by an in-process KV data plane, and helpers to
// compare a disaggregated run with a colocated one. Shared by the engine's disaggregation tests
// (CPU) and the CUDA heterogeneous tests (prefill and decode on different backends).
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "kvcache/kv_in_process.h"
#include "kvcache/kv_landing.h"

namespace tandem::testing_util {

inline EngineOptions Options(const std::string& dir, int32_t block_size, DType dtype) {
  EngineOptions o;
  o.model_dir = dir;
  o.num_kv_blocks = 256;
  o.block_size = block_size;
  o.kv_dtype = dtype;
  o.num_threads = 2;
  return o;
}

inline SequenceRequest Request(std::vector<int32_t> prompt, int max_tokens,
                        std::optional<uint64_t> seed = std::nullopt) {
  SequenceRequest r;
  r.prompt_ids = std::move(prompt);
  r.sampling.temperature = seed ? 0.8f : 0.0f;
  r.sampling.seed = seed;
  r.sampling.ignore_eos = true;
  r.sampling.max_tokens = max_tokens;
  return r;
}

inline std::vector<int32_t> Prompt(int len, int salt, int vocab) {
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

inline std::vector<int32_t> Local(const EngineOptions& o, const SequenceRequest& r) {
  auto e = *Engine::Create(o);
  auto res = e->Generate(r);
  EXPECT_TRUE(res.ok());
  return res->output_ids;
}

inline void ExpectAllFree(Engine& e) {
  EXPECT_EQ(e.pool().num_free_blocks(), e.pool().num_blocks());
  EXPECT_EQ(e.pool().CheckInvariants(), "");
}

}  // namespace tandem::testing_util
