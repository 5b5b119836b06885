// The CUDA backend against the CPU backend and the fixture goldens, driven directly through the
// Backend interface with hand-built batches over a BlockPool (as the engine drives it). Every
// test skips when no CUDA device is present, so GPU-less CI passes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/backends/cuda/cuda_backend.h"
#include "engine/backends/cuda/device_kv_store.h"
#include "engine/engine.h"
#include "engine/internal/rope.h"
#include "engine/model.h"
#include "engine/sampling.h"
#include "kvcache/block_pool.h"
#include "kvcache/kv_store.h"
#include "tests/engine/export_check.h"
#include "tests/engine/test_util.h"

namespace tandem {
namespace {

using testing_util::ReadJson;
using testing_util::TestData;

constexpr int32_t kNumBlocks = 512;

double RelMaxDiff(const std::vector<float>& got, const std::vector<float>& want) {
  double diff = 0;
  double ref = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff = std::max(diff, std::fabs(double{got[i]} - double{want[i]}));
    ref = std::max(ref, std::fabs(double{want[i]}));
  }
  return ref > 0 ? diff / ref : diff;
}

int32_t Argmax(const float* v, int64_t n) {
  return static_cast<int32_t>(std::max_element(v, v + n) - v);
}

// One sequence driven by hand: its tokens so far and the blocks it holds.
struct Sequence {
  std::vector<int32_t> tokens;
  std::vector<BlockId> table;
  int64_t cached = 0;  // tokens whose KV is in the store
};

void Reserve(BlockPool& pool, Sequence& s, int64_t tokens) {
  while (static_cast<int64_t>(s.table.size()) * pool.block_size() < tokens) {
    auto ids = pool.Allocate(1);
    ASSERT_TRUE(ids.ok()) << ids.status();
    s.table.push_back((*ids)[0]);
  }
}

// Runs chunks [cached, cached + n) of every sequence in one Forward; returns logits of the
// sequences asking for them.
std::vector<float> Step(Backend& backend, BlockPool& pool, std::vector<Sequence*> seqs,
                        const std::vector<int64_t>& counts, const std::vector<bool>& want,
                        int32_t vocab) {
  std::vector<SequenceChunk> chunks(seqs.size());
  int64_t n_logits = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    Sequence& s = *seqs[i];
    Reserve(pool, s, s.cached + counts[i]);
    chunks[i].tokens = std::span<const int32_t>(s.tokens).subspan(s.cached, counts[i]);
    chunks[i].start_pos = s.cached;
    chunks[i].block_table = s.table;
    chunks[i].want_logits = want[i];
    n_logits += want[i] ? 1 : 0;
  }
  std::vector<float> logits(n_logits * vocab);
  ForwardBatch batch;
  batch.chunks = chunks;
  absl::Status st = backend.Forward(batch, logits);
  EXPECT_TRUE(st.ok()) << st;
  for (size_t i = 0; i < seqs.size(); ++i) {
    seqs[i]->cached += counts[i];
  }
  return logits;
}

struct GreedyRun {
  std::vector<float> prompt_logits;
  std::vector<std::vector<float>> step_logits;  // logits that chose greedy[i + 1]
  std::vector<int32_t> greedy;
  Sequence seq;
};

// Prefill (in pieces of `piece` tokens; 0 = all at once), then greedy decode of `steps` tokens.
GreedyRun RunGreedy(Backend& backend, BlockPool& pool, const std::vector<int32_t>& prompt,
                    int steps, int64_t piece, int32_t vocab) {
  GreedyRun run;
  run.seq.tokens = prompt;
  const int64_t n = static_cast<int64_t>(prompt.size());
  const int64_t step = piece > 0 ? piece : n;
  while (run.seq.cached < n) {
    const int64_t count = std::min(step, n - run.seq.cached);
    const bool last = run.seq.cached + count == n;
    std::vector<float> l = Step(backend, pool, {&run.seq}, {count}, {last}, vocab);
    if (last) {
      run.prompt_logits = l;
    }
  }
  int32_t next = Argmax(run.prompt_logits.data(), vocab);
  for (int i = 0; i < steps; ++i) {
    run.greedy.push_back(next);
    if (i + 1 == steps) {
      break;
    }
    run.seq.tokens.push_back(next);
    std::vector<float> l = Step(backend, pool, {&run.seq}, {1}, {true}, vocab);
    next = Argmax(l.data(), vocab);
    run.step_logits.push_back(std::move(l));
  }
  return run;
}

// Every layer's K and V of tokens [0, n) in fp32 canonical layout.
std::vector<float> ReadAllKv(const KvStore& store, const Sequence& s, int64_t n) {
  const KvStoreLayout& layout = store.layout();
  const int64_t te = layout.geometry.token_elems();
  std::vector<float> out;
  std::vector<float> k(n * te);
  std::vector<float> v(n * te);
  for (int32_t l = 0; l < layout.geometry.num_layers; ++l) {
    absl::Status st = store.ReadTokens(l, s.table, 0, n, DType::kF32, k.data(), v.data());
    EXPECT_TRUE(st.ok()) << st;
    out.insert(out.end(), k.begin(), k.end());
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
}

class CudaBackendTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) {
      GTEST_SKIP() << "no CUDA device";
    }
    dir_ = TestData("models/" + GetParam());
    auto model = LoadModelWeights(dir_);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    golden_ = ReadJson(dir_ + "/golden.json");
    ASSERT_FALSE(golden_["cases"].empty());
  }

  KvStoreLayout Layout(int32_t block_size, DType dtype) const {
    const ModelConfig& c = model_->config;
    return KvStoreLayout{KvGeometry{c.num_layers, c.num_kv_heads, c.head_dim}, block_size, dtype,
                         kNumBlocks};
  }

  std::unique_ptr<Backend> Cuda(const KvStoreLayout& layout, CudaBackendOptions opts = {}) {
    auto b = CreateCudaBackend(*model_, layout, BackendOptions{},
                               internal::RopeTable::Create(model_->config).inv_freq(), opts);
    EXPECT_TRUE(b.ok()) << b.status();
    return b.ok() ? std::move(*b) : nullptr;
  }

  std::unique_ptr<Backend> Cpu(const KvStoreLayout& layout) {
    BackendOptions opts;
    opts.num_threads = 2;
    auto b = CreateCpuBackend(*model_, layout, opts);
    EXPECT_TRUE(b.ok()) << b.status();
    return b.ok() ? std::move(*b) : nullptr;
  }

  int32_t vocab() const { return model_->config.vocab_size; }

  std::string dir_;
  std::unique_ptr<ModelWeights> model_;
  nlohmann::json golden_;
};

TEST_P(CudaBackendTest, LogitsAndGreedyMatchGoldens) {
  for (int32_t block_size : {16, 1, 64}) {
    auto backend = Cuda(Layout(block_size, DType::kF32));
    ASSERT_NE(backend, nullptr);
    for (const auto& c : golden_["cases"]) {
      BlockPool pool(kNumBlocks, block_size);
      const auto prompt = c["input_ids"].get<std::vector<int32_t>>();
      const auto want_ids = c["greedy_ids"].get<std::vector<int32_t>>();
      const auto want_logits = c["last_logits"].get<std::vector<float>>();
      GreedyRun run = RunGreedy(*backend, pool, prompt, static_cast<int>(want_ids.size()), 0,
                                vocab());
      EXPECT_LE(RelMaxDiff(run.prompt_logits, want_logits), 1e-3)
          << "block size " << block_size << ", prompt of " << prompt.size() << " tokens";
      EXPECT_EQ(run.greedy, want_ids)
          << "block size " << block_size << ", prompt of " << prompt.size() << " tokens";
    }
  }
}

TEST_P(CudaBackendTest, MatchesCpuBackendLogitsAndKv) {
  for (DType kv_dtype : {DType::kF32, DType::kBF16}) {
    const KvStoreLayout layout = Layout(16, kv_dtype);
    auto gpu = Cuda(layout);
    auto cpu = Cpu(layout);
    ASSERT_NE(gpu, nullptr);
    ASSERT_NE(cpu, nullptr);
    // bf16 KV: a value near a rounding boundary may round differently on the two backends.
    const double kv_tol = kv_dtype == DType::kF32 ? 2e-4 : 1e-2;
    const double logit_tol = kv_dtype == DType::kF32 ? 2e-4 : 2e-3;
    for (const auto& c : golden_["cases"]) {
      const auto prompt = c["input_ids"].get<std::vector<int32_t>>();
      BlockPool gpu_pool(kNumBlocks, 16);
      BlockPool cpu_pool(kNumBlocks, 16);
      GreedyRun g = RunGreedy(*gpu, gpu_pool, prompt, 8, 0, vocab());
      GreedyRun r = RunGreedy(*cpu, cpu_pool, prompt, 8, 0, vocab());
      EXPECT_LE(RelMaxDiff(g.prompt_logits, r.prompt_logits), logit_tol) << prompt.size();
      EXPECT_EQ(g.greedy, r.greedy) << prompt.size();
      for (size_t i = 0; i < std::min(g.step_logits.size(), r.step_logits.size()); ++i) {
        EXPECT_LE(RelMaxDiff(g.step_logits[i], r.step_logits[i]), logit_tol) << "step " << i;
      }
      const int64_t n = g.seq.cached;
      ASSERT_EQ(n, r.seq.cached);
      EXPECT_LE(RelMaxDiff(ReadAllKv(gpu->kv_store(), g.seq, n),
                           ReadAllKv(cpu->kv_store(), r.seq, n)),
                kv_tol)
          << DTypeName(kv_dtype) << ", prompt of " << prompt.size() << " tokens";
    }
  }
}

TEST_P(CudaBackendTest, ChunkedPrefillAndMixedBatchesGiveTheSameLogits) {
  const KvStoreLayout layout = Layout(16, DType::kF32);
  auto backend = Cuda(layout);
  ASSERT_NE(backend, nullptr);
  const auto& cases = golden_["cases"];
  // The longest prompt, prefilled whole and in 7-token pieces.
  std::vector<int32_t> longest;
  for (const auto& c : cases) {
    auto ids = c["input_ids"].get<std::vector<int32_t>>();
    if (ids.size() > longest.size()) {
      longest = ids;
    }
  }
  BlockPool pool(kNumBlocks, 16);
  GreedyRun whole = RunGreedy(*backend, pool, longest, 4, 0, vocab());
  GreedyRun pieces = RunGreedy(*backend, pool, longest, 4, 7, vocab());
  EXPECT_LE(RelMaxDiff(pieces.prompt_logits, whole.prompt_logits), 1e-4);
  EXPECT_EQ(pieces.greedy, whole.greedy);

  // One step holding a decode token of `a` and the whole prompt of `b`: same logits as alone.
  const auto pa = cases[0]["input_ids"].get<std::vector<int32_t>>();
  const auto pb = cases[cases.size() - 1]["input_ids"].get<std::vector<int32_t>>();
  GreedyRun alone_a = RunGreedy(*backend, pool, pa, 2, 0, vocab());
  GreedyRun alone_b = RunGreedy(*backend, pool, pb, 1, 0, vocab());
  Sequence a;
  a.tokens = pa;
  Step(*backend, pool, {&a}, {static_cast<int64_t>(pa.size())}, {false}, vocab());
  a.tokens.push_back(alone_a.greedy[0]);
  Sequence b;
  b.tokens = pb;
  std::vector<float> both = Step(*backend, pool, {&a, &b},
                                 {1, static_cast<int64_t>(pb.size())}, {true, true}, vocab());
  ASSERT_EQ(both.size(), 2u * vocab());
  std::vector<float> got_a(both.begin(), both.begin() + vocab());
  std::vector<float> got_b(both.begin() + vocab(), both.end());
  EXPECT_LE(RelMaxDiff(got_a, alone_a.step_logits[0]), 1e-4);
  EXPECT_LE(RelMaxDiff(got_b, alone_b.prompt_logits), 1e-4);
}

// Greedy rows reduced on the device: the same token and logprob as PickGreedy over the row that
// a full copy returns, and the rows that are not picks still come back whole and in order.
TEST_P(CudaBackendTest, DevicePicksEqualTheHostPickOfTheFullRow) {
  const KvStoreLayout layout = Layout(16, DType::kF32);
  auto backend = Cuda(layout);
  ASSERT_NE(backend, nullptr);
  ASSERT_TRUE(backend->ReturnsPicks());
  BlockPool pool(kNumBlocks, 16);
  const auto& cases = golden_["cases"];
  auto run = [&](const std::vector<bool>& pick, std::vector<TokenPick>* picks) {
    std::vector<Sequence> seqs(3);
    std::vector<SequenceChunk> chunks(3);
    int64_t n_full = 0;
    int64_t n_picks = 0;
    for (size_t i = 0; i < 3; ++i) {
      seqs[i].tokens = cases[i % cases.size()]["input_ids"].get<std::vector<int32_t>>();
      seqs[i].tokens.push_back(static_cast<int32_t>(i + 1));  // distinct prompts
      Reserve(pool, seqs[i], static_cast<int64_t>(seqs[i].tokens.size()));
      chunks[i].tokens = seqs[i].tokens;
      chunks[i].block_table = seqs[i].table;
      chunks[i].want_logits = true;
      chunks[i].pick = pick[i];
      (pick[i] ? n_picks : n_full) += 1;
    }
    std::vector<float> logits(n_full * vocab());
    picks->assign(n_picks, TokenPick{-1, 0.0f});
    ForwardBatch batch;
    batch.chunks = chunks;
    batch.picks = *picks;
    absl::Status st = backend->Forward(batch, logits);
    EXPECT_TRUE(st.ok()) << st;
    for (auto& s : seqs) pool.Release(s.table);
    return logits;
  };
  std::vector<TokenPick> none;
  const std::vector<float> full = run({false, false, false}, &none);
  std::vector<TokenPick> picks;
  const std::vector<float> mixed = run({true, false, true}, &picks);
  ASSERT_EQ(picks.size(), 2u);
  ASSERT_EQ(mixed.size(), static_cast<size_t>(vocab()));
  const std::span<const float> rows(full);
  EXPECT_LE(RelMaxDiff(mixed, std::vector<float>(rows.begin() + vocab(),
                                                 rows.begin() + 2 * vocab())),
            1e-6);
  for (int k = 0; k < 2; ++k) {
    const int row = k == 0 ? 0 : 2;
    const TokenPick want = PickGreedy(rows.subspan(row * vocab(), vocab()));
    EXPECT_EQ(picks[k].token, want.token) << "row " << row;
    EXPECT_NEAR(picks[k].logprob, want.logprob, 1e-4) << "row " << row;
  }
  EXPECT_EQ(pool.num_free_blocks(), pool.num_blocks());
}

// Greedy decode replayed as CUDA graphs: the same tokens and logprobs as ordinary launches,
// captured once per batch size and replayed for the later steps; then through the engine.
TEST_P(CudaBackendTest, CudaGraphDecodeGivesTheSameTokens) {
  const KvStoreLayout layout = Layout(16, DType::kF32);
  CudaBackendOptions with_graphs;
  with_graphs.cuda_graphs = true;
  auto graphs = Cuda(layout, with_graphs);
  auto plain = Cuda(layout);
  ASSERT_NE(graphs, nullptr);
  ASSERT_NE(plain, nullptr);
  const auto& cases = golden_["cases"];
  auto decode = [&](Backend& backend, std::vector<std::vector<TokenPick>>* steps) {
    BlockPool pool(kNumBlocks, 16);
    std::vector<Sequence> seqs(3);
    std::vector<Sequence*> all;
    for (size_t i = 0; i < seqs.size(); ++i) {
      seqs[i].tokens = cases[i % cases.size()]["input_ids"].get<std::vector<int32_t>>();
      seqs[i].tokens.push_back(static_cast<int32_t>(i + 2));
      all.push_back(&seqs[i]);
      Step(backend, pool, {&seqs[i]}, {static_cast<int64_t>(seqs[i].tokens.size())}, {false},
           vocab());
    }
    for (int step = 0; step < 6; ++step) {
      std::vector<SequenceChunk> chunks(seqs.size());
      for (size_t i = 0; i < seqs.size(); ++i) {
        Reserve(pool, seqs[i], seqs[i].cached + 1);
        chunks[i].tokens = std::span<const int32_t>(seqs[i].tokens).subspan(seqs[i].cached, 1);
        chunks[i].start_pos = seqs[i].cached;
        chunks[i].block_table = seqs[i].table;
        chunks[i].want_logits = true;
        chunks[i].pick = true;
      }
      std::vector<TokenPick> picks(seqs.size());
      ForwardBatch batch;
      batch.chunks = chunks;
      batch.picks = picks;
      absl::Status st = backend.Forward(batch, {});
      ASSERT_TRUE(st.ok()) << st;
      for (size_t i = 0; i < seqs.size(); ++i) {
        seqs[i].cached += 1;
        seqs[i].tokens.push_back(picks[i].token);
      }
      steps->push_back(picks);
    }
  };
  std::vector<std::vector<TokenPick>> want, got;
  decode(*plain, &want);
  decode(*graphs, &got);
  ASSERT_EQ(got.size(), want.size());
  for (size_t s = 0; s < want.size(); ++s) {
    for (size_t i = 0; i < want[s].size(); ++i) {
      EXPECT_EQ(got[s][i].token, want[s][i].token) << "step " << s << " seq " << i;
      EXPECT_NEAR(got[s][i].logprob, want[s][i].logprob, 1e-5) << "step " << s << " seq " << i;
    }
  }
  const CudaGraphStats stats = GetCudaGraphStats(*graphs);
  EXPECT_FALSE(stats.failed);
  EXPECT_GE(stats.captured, 1);
  EXPECT_GE(stats.replayed, 6);
  EXPECT_EQ(GetCudaGraphStats(*plain).replayed, 0);

  // Through the engine: a batch of greedy requests, graphs on and off.
  EngineOptions eo;
  eo.model_dir = dir_;
  eo.backend = "cuda";
  eo.num_kv_blocks = 256;
  auto run_engine = [&](bool use_graphs) {
    eo.gpu_graphs = use_graphs;
    auto engine = Engine::Create(eo);
    EXPECT_TRUE(engine.ok()) << engine.status();
    std::vector<SeqId> ids;
    for (int i = 0; i < 4; ++i) {
      SequenceRequest r;
      r.prompt_ids = {1, 2 + i, 3, 4 + 2 * i};
      r.sampling.temperature = 0.0f;
      r.sampling.ignore_eos = true;
      r.sampling.max_tokens = 12;
      ids.push_back(*(*engine)->Add(r));
    }
    std::map<SeqId, std::vector<int32_t>> out;
    while ((*engine)->HasWork()) {
      auto events = (*engine)->Step();
      EXPECT_TRUE(events.ok()) << events.status();
      for (const TokenEvent& ev : *events) out[ev.seq].push_back(ev.token);
    }
    if (use_graphs) {
      EXPECT_GT(GetCudaGraphStats((*engine)->backend()).replayed, 0);
    }
    return out;
  };
  EXPECT_EQ(run_engine(true), run_engine(false));
}

TEST_P(CudaBackendTest, SplitKAttentionMatchesUnsplit) {
  const KvStoreLayout layout = Layout(16, DType::kF32);
  CudaBackendOptions no_split;
  no_split.max_attention_splits = 1;
  auto split = Cuda(layout);
  auto single = Cuda(layout, no_split);
  ASSERT_NE(split, nullptr);
  ASSERT_NE(single, nullptr);
  for (const auto& c : golden_["cases"]) {
    const auto prompt = c["input_ids"].get<std::vector<int32_t>>();
    BlockPool p1(kNumBlocks, 16);
    BlockPool p2(kNumBlocks, 16);
    GreedyRun a = RunGreedy(*split, p1, prompt, 6, 0, vocab());
    GreedyRun b = RunGreedy(*single, p2, prompt, 6, 0, vocab());
    EXPECT_LE(RelMaxDiff(a.prompt_logits, b.prompt_logits), 1e-4) << prompt.size();
    for (size_t i = 0; i < a.step_logits.size(); ++i) {
      EXPECT_LE(RelMaxDiff(a.step_logits[i], b.step_logits[i]), 1e-4) << "step " << i;
    }
  }
}

TEST_P(CudaBackendTest, WeightDtypeActivationsStayWithinBf16Tolerance) {
  const KvStoreLayout layout = Layout(16, DType::kF32);
  CudaBackendOptions fast;
  fast.activation_precision = GpuActivationPrecision::kWeightDtype;
  auto backend = Cuda(layout, fast);
  ASSERT_NE(backend, nullptr);
  for (const auto& c : golden_["cases"]) {
    const auto prompt = c["input_ids"].get<std::vector<int32_t>>();
    const auto want_ids = c["greedy_ids"].get<std::vector<int32_t>>();
    const auto margins = c["greedy_margins"].get<std::vector<float>>();
    BlockPool pool(kNumBlocks, 16);
    GreedyRun run = RunGreedy(*backend, pool, prompt, 1, 0, vocab());
    EXPECT_LE(RelMaxDiff(run.prompt_logits, c["last_logits"].get<std::vector<float>>()), 2e-2)
        << prompt.size();
    if (margins[0] >= 0.5f) {
      EXPECT_EQ(run.greedy[0], want_ids[0]) << prompt.size();
    }
  }
}

// Layer-wise KV export through pinned staging on the export stream: what arrives is what the
// store holds, with the whole layer image at once, in passes of 3 tokens through a small
// staging buffer, and with at most one layer pending (the host waits for each in turn).
TEST_P(CudaBackendTest, KvExportDeliversWhatTheStoreHolds) {
  const auto a = golden_["cases"][2]["input_ids"].get<std::vector<int32_t>>();
  std::vector<int32_t> b = golden_["cases"][0]["input_ids"].get<std::vector<int32_t>>();
  b.push_back(3);
  for (DType dtype : {DType::kBF16, DType::kF32}) {
    const KvStoreLayout layout = Layout(16, dtype);
    const int64_t token_bytes = layout.geometry.token_elems() * DTypeSize(dtype);
    CudaBackendOptions small_staging;
    small_staging.export_staging_bytes = 2 * 3 * token_bytes;
    CudaBackendOptions one_pending;
    one_pending.export_pending_bytes = 1;
    for (const CudaBackendOptions& opts : {CudaBackendOptions{}, small_staging, one_pending}) {
      SCOPED_TRACE(testing::Message() << "dtype " << DTypeName(dtype) << " staging "
                                      << opts.export_staging_bytes << " pending "
                                      << opts.export_pending_bytes);
      auto backend = Cuda(layout, opts);
      ASSERT_NE(backend, nullptr);
      testing_util::ExpectExportsMatchStore(*backend, a, b, vocab());
    }
  }
}

TEST_P(CudaBackendTest, KvPoolFromAFractionOfFreeMemory) {
  KvStoreLayout layout = Layout(16, DType::kBF16);
  layout.num_blocks = 0;  // decided by the backend
  const ModelConfig& c = model_->config;
  const int64_t per_block = 2LL * c.num_layers * 16 * c.num_kv_heads * c.head_dim * 2;
  BackendOptions opts;
  opts.max_batch_tokens = 256;
  opts.max_logit_rows = 8;
  opts.kv_memory_fraction = 0.02;
  auto free_before = CudaFreeMemoryBytes(0);
  ASSERT_TRUE(free_before.ok());
  auto b = CreateCudaBackend(*model_, layout, opts,
                             internal::RopeTable::Create(c).inv_freq());
  ASSERT_TRUE(b.ok()) << b.status();
  const int64_t blocks = (*b)->kv_store().layout().num_blocks;
  // 2 % of what was free after the (small) weights and workspace: close to 2 % of before.
  const double want = 0.02 * static_cast<double>(*free_before) / per_block;
  EXPECT_GT(blocks, 0.9 * want);
  EXPECT_LE(blocks, want + 1);
  b->reset();
  // A cap wins over the fraction.
  opts.max_kv_blocks = 7;
  auto capped = CreateCudaBackend(*model_, layout, opts,
                                  internal::RopeTable::Create(c).inv_freq());
  ASSERT_TRUE(capped.ok()) << capped.status();
  EXPECT_EQ((*capped)->kv_store().layout().num_blocks, 7);
  // Through the engine: the pool takes the backend's count.
  EngineOptions eo;
  eo.model_dir = dir_;
  eo.backend = "cuda";
  eo.kv_dtype = DType::kBF16;
  eo.kv_memory_fraction = 0.01;
  eo.max_num_seqs = 4;
  auto engine = Engine::Create(eo);
  ASSERT_TRUE(engine.ok()) << engine.status();
  EXPECT_EQ((*engine)->pool().num_blocks(),
            (*engine)->backend().kv_store().layout().num_blocks);
  SequenceRequest r;
  r.prompt_ids = {1, 2, 3};
  r.sampling.temperature = 0.0f;
  r.sampling.ignore_eos = true;
  r.sampling.max_tokens = 4;
  auto out = (*engine)->Generate(r);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->output_ids.size(), 4u);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaBackendTest,
                         ::testing::Values("llama3_gqa_bf16", "qwen2_tied_bias_bf16",
                                           "llama2_mha_f16", "mistral_gqa_headdim_f32"),
                         [](const auto& info) { return info.param; });

// The device store alone: canonical writes and reads with dtype conversion across block edges.
TEST(DeviceKvStoreTest, WriteReadRoundTripConvertsDtypes) {
  if (CudaDeviceCount() == 0) {
    GTEST_SKIP() << "no CUDA device";
  }
  for (DType store_type : {DType::kF32, DType::kF16, DType::kBF16}) {
    const KvStoreLayout layout{KvGeometry{2, 3, 32}, 5, store_type, 16};
    auto created = DeviceKvStore::Create(layout, 0);
    ASSERT_TRUE(created.ok()) << created.status();
    KvStore& store = **created;
    const int64_t te = layout.geometry.token_elems();
    const std::vector<BlockId> table = {7, 2, 11, 0};
    const int64_t first = 3;
    const int64_t n = 13;  // tokens 3..15: blocks 7, 2, 11, 0
    std::vector<float> k(n * te);
    std::vector<float> v(n * te);
    for (size_t i = 0; i < k.size(); ++i) {
      k[i] = 0.001f * static_cast<float>(i) - 1.5f;
      v[i] = -0.37f * static_cast<float>(i % 97) + 0.1f;
    }
    ASSERT_TRUE(store.WriteTokens(1, table, first, n, DType::kF32, k.data(), v.data()).ok());
    std::vector<float> k2(n * te);
    std::vector<float> v2(n * te);
    ASSERT_TRUE(store.ReadTokens(1, table, first, n, DType::kF32, k2.data(), v2.data()).ok());
    std::vector<float> k_want = k;
    std::vector<float> v_want = v;
    if (store_type != DType::kF32) {
      std::vector<uint16_t> tmp(k.size());
      ConvertElements(DType::kF32, k.data(), store_type, tmp.data(), k.size());
      ConvertElements(store_type, tmp.data(), DType::kF32, k_want.data(), k.size());
      ConvertElements(DType::kF32, v.data(), store_type, tmp.data(), v.size());
      ConvertElements(store_type, tmp.data(), DType::kF32, v_want.data(), v.size());
    }
    EXPECT_EQ(k2, k_want) << DTypeName(store_type);
    EXPECT_EQ(v2, v_want) << DTypeName(store_type);
    // Layer 0 was never written: zeros.
    ASSERT_TRUE(store.ReadTokens(0, table, first, n, DType::kF32, k2.data(), v2.data()).ok());
    EXPECT_TRUE(std::all_of(k2.begin(), k2.end(), [](float x) { return x == 0.0f; }));
    // A sub-range read in the store's own dtype, starting mid-block.
    if (store_type != DType::kF32) {
      std::vector<uint16_t> raw_k(4 * te);
      std::vector<uint16_t> raw_v(4 * te);
      ASSERT_TRUE(store.ReadTokens(1, table, 6, 4, store_type, raw_k.data(), raw_v.data()).ok());
      std::vector<float> back(4 * te);
      ConvertElements(store_type, raw_v.data(), DType::kF32, back.data(), back.size());
      EXPECT_TRUE(std::equal(back.begin(), back.end(), v_want.begin() + 3 * te));
    }
    // Validation happens before any copy.
    const std::vector<BlockId> bad = {7, 99};
    EXPECT_EQ(store.WriteTokens(0, bad, 0, 10, DType::kF32, k.data(), v.data()).code(),
              absl::StatusCode::kOutOfRange);
    EXPECT_EQ(store.ReadTokens(0, table, 15, 10, DType::kF32, k2.data(), v2.data()).code(),
              absl::StatusCode::kOutOfRange);
    EXPECT_EQ(store.ReadTokens(2, table, 0, 1, DType::kF32, k2.data(), v2.data()).code(),
              absl::StatusCode::kOutOfRange);
  }
}

}  // namespace
}  // namespace tandem
