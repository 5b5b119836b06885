// Continuous-batching step loop over the paged KV cache: scheduling, prefix cache, preemption
// by recomputation, sampling and stop conditions.
#include "engine/engine.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <iterator>
#include <random>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "engine/text_stream.h"

namespace tandem {

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kNone:
      return "";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kAbort:
      return "abort";
  }
  return "";
}

struct Engine::Sequence {
  SeqId id = 0;
  std::vector<int32_t> tokens;  // prompt + generated
  size_t prompt_len = 0;
  int64_t num_computed = 0;     // tokens whose KV is in the cache
  std::vector<BlockId> blocks;
  std::vector<BlockHash> hashes;  // chained hashes of full blocks of `tokens`
  size_t published = 0;           // blocks published to the prefix cache
  bool started = false;           // blocks held (false: waiting)
  bool scheduled = false;         // part of the step being built
  SamplingParams params;
  ResolvedSampling resolved;
  Rng rng{0};                     // unseeded requests; seeded ones draw from SeededRng(index)
  TokenHistory history;
  std::vector<int32_t> banned;    // EOS + stop ids while below min_tokens
  bool want_prompt_logits = false;
  std::unique_ptr<TextStream> text;
  FinishReason finish = FinishReason::kNone;
  int32_t cached_tokens = -1;     // prompt tokens found in the prefix cache at first start
  // Disaggregated prefill (see SequenceRequest).
  bool prefill_only = false;
  bool handed_off = false;        // prefill_only: sampled its token, leaves at the end of the step
  OutgoingTransfer* kv_export = nullptr;
  int64_t exported = 0;           // tokens whose KV went out in every layer
  absl::Status export_status;

  int32_t num_output() const { return static_cast<int32_t>(tokens.size() - prompt_len); }
};

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  std::unique_ptr<Engine> e(new Engine());
  e->options_ = options;
  auto model = LoadModelWeights(options.model_dir);
  if (!model.ok()) {
    return model.status();
  }
  e->model_ = *std::move(model);
  const ModelConfig& c = e->model_->config;

  std::error_code ec;
  if (std::filesystem::exists(std::filesystem::path(options.model_dir) / "tokenizer.json", ec)) {
    auto tok = Tokenizer::FromDir(options.model_dir);
    if (!tok.ok()) {
      return tok.status();
    }
    e->tokenizer_ = *std::move(tok);
  }

  if (options.block_size <= 0 || options.block_size > 1024) {
    return absl::InvalidArgumentError("block_size must be in [1, 1024]");
  }
  if (options.max_batch_tokens <= 0 || options.max_num_seqs <= 0) {
    return absl::InvalidArgumentError("max_batch_tokens and max_num_seqs must be positive");
  }
  if (!(options.kv_memory_fraction >= 0 && options.kv_memory_fraction <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_memory_fraction must be in (0, 1] (0: off), got ",
                     options.kv_memory_fraction));
  }
  e->max_model_len_ = options.max_model_len > 0
                          ? std::min<int64_t>(options.max_model_len, c.max_position_embeddings)
                          : c.max_position_embeddings;
  if (e->max_model_len_ <= 1) {
    return absl::InvalidArgumentError("max_model_len must be at least 2");
  }

  KvStoreLayout layout;
  layout.geometry = KvGeometry{c.num_layers, c.num_kv_heads, c.head_dim};
  layout.block_size = options.block_size;
  layout.dtype = options.kv_dtype;
  // Never more blocks than the whole context of max_num_seqs sequences would need.
  const int64_t useful_blocks = (e->max_model_len_ + options.block_size - 1) /
                                options.block_size * options.max_num_seqs;
  const bool by_fraction = options.kv_memory_fraction != 0 && options.num_kv_blocks <= 0;
  int64_t blocks = options.num_kv_blocks;
  if (by_fraction) {
    blocks = 1;  // placeholder: the backend sizes its store from free device memory
  } else if (blocks <= 0) {
    const int64_t per_block = 2 * static_cast<int64_t>(c.num_layers) * options.block_size *
                              layout.geometry.token_elems() * DTypeSize(options.kv_dtype);
    blocks = std::min(options.kv_cache_bytes / per_block, useful_blocks);
  }
  if (blocks <= 0 || blocks > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV cache size gives ", blocks, " blocks; raise kv_cache_bytes or num_kv_blocks"));
  }
  layout.num_blocks = static_cast<int32_t>(blocks);
  BackendOptions bo;
  bo.num_threads = options.num_threads;
  bo.max_batch_tokens = options.max_batch_tokens;
  bo.max_logit_rows = std::min(options.max_batch_tokens, options.max_num_seqs);
  bo.gpu_exact_activations = options.gpu_exact_activations;
  bo.gpu_graphs = options.gpu_graphs;
  if (by_fraction) {
    bo.kv_memory_fraction = options.kv_memory_fraction;
    bo.max_kv_blocks = static_cast<int32_t>(std::min<int64_t>(useful_blocks, int64_t{1} << 30));
  }
  auto backend = CreateBackend(options.backend, *e->model_, layout, bo);
  if (!backend.ok()) {
    return backend.status();
  }
  e->backend_ = *std::move(backend);
  const KvStoreLayout& sized = e->backend_->kv_store().layout();
  e->pool_ = std::make_unique<BlockPool>(sized.num_blocks, sized.block_size);

  // End-of-sequence ids: generation_config, config and tokenizer, as vLLM merges them.
  auto add_eos = [&](int32_t id) {
    if (id >= 0 && id < c.vocab_size &&
        std::find(e->eos_ids_.begin(), e->eos_ids_.end(), id) == e->eos_ids_.end()) {
      e->eos_ids_.push_back(id);
    }
  };
  for (int32_t id : e->model_->generation.eos_token_ids) add_eos(id);
  for (int32_t id : c.eos_token_ids) add_eos(id);
  if (e->tokenizer_ && e->tokenizer_->eos_token_id()) add_eos(*e->tokenizer_->eos_token_id());
  e->prefix_seed_ = e->model_->fingerprint ^ (static_cast<uint64_t>(options.kv_dtype) << 56);
  return e;
}

Engine::~Engine() {
  for (auto& s : seqs_) ReleaseBlocks(*s);
}

absl::Status Engine::Validate(const SequenceRequest& request) const {
  const ModelConfig& c = model_->config;
  if (request.prompt_ids.empty()) {
    return absl::InvalidArgumentError("prompt: must not be empty");
  }
  for (const auto* ids : {&request.prompt_ids, &request.output_ids}) {
    for (int32_t id : *ids) {
      if (id < 0 || id >= c.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            ids == &request.prompt_ids ? "prompt" : "output_ids", ": token id ", id,
            " is outside the vocabulary [0, ", c.vocab_size, ")"));
      }
    }
  }
  const int64_t plen = static_cast<int64_t>(request.prompt_ids.size());
  if (plen >= max_model_len_) {
    return absl::InvalidArgumentError(absl::StrCat("prompt: ", plen,
                                                   " tokens leave no room in the context of ",
                                                   max_model_len_, " tokens"));
  }
  if (absl::Status s = ValidateSamplingParams(request.sampling, c.vocab_size); !s.ok()) {
    return s;
  }
  if (plen + request.sampling.max_tokens > max_model_len_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_tokens: prompt (", plen, ") + max_tokens (", request.sampling.max_tokens,
        ") exceeds the context of ", max_model_len_, " tokens"));
  }
  if (static_cast<int64_t>(request.output_ids.size()) >= request.sampling.max_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("output_ids: ", request.output_ids.size(),
                     " tokens already generated leave nothing of max_tokens (",
                     request.sampling.max_tokens, ")"));
  }
  if (!request.sampling.stop.empty() && tokenizer_ == nullptr) {
    return absl::InvalidArgumentError("stop: stop strings need a model folder with a tokenizer");
  }
  if (request.kv_export != nullptr && !request.prefill_only) {
    return absl::InvalidArgumentError("kv_export: only prefill_only sequences export KV");
  }
  const int64_t need_blocks =
      (plen + request.sampling.max_tokens + pool_->block_size() - 1) / pool_->block_size();
  if (need_blocks > pool_->num_blocks()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "sequence needs ", need_blocks, " KV blocks; the pool has ", pool_->num_blocks()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Engine::Sequence>> Engine::NewSequence(
    SequenceRequest& request) {
  if (absl::Status st = Validate(request); !st.ok()) {
    return st;
  }
  auto s = std::make_unique<Sequence>();
  s->id = next_id_++;
  s->tokens = std::move(request.prompt_ids);
  s->prompt_len = s->tokens.size();
  s->history.AddPrompt(s->tokens);
  for (int32_t id : request.output_ids) s->history.AddOutput(id);
  s->tokens.insert(s->tokens.end(), request.output_ids.begin(), request.output_ids.end());
  s->params = std::move(request.sampling);
  s->resolved = ResolveSampling(s->params, model_->generation);
  s->rng = Rng(std::random_device{}() ^ (static_cast<uint64_t>(std::random_device{}()) << 32));
  s->want_prompt_logits = request.want_prompt_logits;
  if (tokenizer_ != nullptr) {
    s->text = std::make_unique<TextStream>(*tokenizer_, s->tokens, s->params.stop);
  }
  if (s->params.min_tokens > 0) {
    if (!s->params.ignore_eos) s->banned = eos_ids_;
    s->banned.insert(s->banned.end(), s->params.stop_token_ids.begin(),
                     s->params.stop_token_ids.end());
  }
  s->prefill_only = request.prefill_only;
  s->kv_export = request.kv_export;
  return s;
}

absl::StatusOr<SeqId> Engine::Add(SequenceRequest request) {
  auto s = NewSequence(request);
  if (!s.ok()) {
    return s.status();
  }
  const SeqId id = (*s)->id;
  seqs_.push_back(*std::move(s));
  return id;
}

absl::StatusOr<SeqId> Engine::AddPrefilled(SequenceRequest request, std::vector<BlockId> blocks,
                                           int32_t first_token, float first_logprob) {
  request.prefill_only = false;
  request.kv_export = nullptr;
  auto made = NewSequence(request);
  if (!made.ok()) {
    pool_->Release(blocks);
    return made.status();
  }
  Sequence& s = **made;
  const int64_t n = static_cast<int64_t>(s.tokens.size());
  if (static_cast<int64_t>(blocks.size()) * pool_->block_size() < n) {
    pool_->Release(blocks);
    return absl::InvalidArgumentError(absl::StrCat("blocks: ", blocks.size(),
                                                   " blocks do not hold ", n, " tokens"));
  }
  if (first_token < 0 || first_token >= model_->config.vocab_size) {
    pool_->Release(blocks);
    return absl::InvalidArgumentError(
        absl::StrCat("first_token: id ", first_token, " is outside the vocabulary"));
  }
  s.blocks = std::move(blocks);
  s.num_computed = n;
  s.started = true;
  s.cached_tokens = 0;
  PublishFullBlocks(s);
  TokenEvent ev;
  ev.seq = s.id;
  SampledToken t;
  t.token = first_token;
  t.logprob = first_logprob;
  ProcessSampled(s, t, ev);
  ev.finish = s.finish;
  const SeqId id = s.id;
  if (s.finish != FinishReason::kNone) {
    ReleaseBlocks(s);
  } else {
    seqs_.push_back(*std::move(made));
  }
  pending_events_.push_back(std::move(ev));
  return id;
}

void Engine::ReleaseBlocks(Sequence& s) {
  if (!s.blocks.empty()) {
    pool_->Release(s.blocks);
  }
  s.blocks.clear();
  s.published = 0;
  s.num_computed = 0;
  s.started = false;
}

void Engine::Abort(SeqId id) {
  for (auto it = seqs_.begin(); it != seqs_.end(); ++it) {
    if ((*it)->id == id) {
      ReleaseBlocks(**it);
      seqs_.erase(it);
      return;
    }
  }
}

bool Engine::HasWork() const { return !seqs_.empty() || !pending_events_.empty(); }
size_t Engine::num_sequences() const { return seqs_.size(); }

EngineLoad Engine::Load() const {
  EngineLoad l;
  for (const auto& s : seqs_) {
    if (s->started) {
      ++l.running;
    } else {
      ++l.waiting;
    }
    const int64_t left = static_cast<int64_t>(s->tokens.size()) - s->num_computed;
    if (!s->started || left > 1) {
      l.queued_prefill_tokens += left;
    }
  }
  const BlockPoolStats ps = pool_->Stats();
  l.free_blocks = pool_->num_free_blocks();
  l.total_blocks = pool_->num_blocks();
  l.prefix_queries = ps.prefix_queries;
  l.prefix_hits = ps.prefix_hits;
  return l;
}

void Engine::SendExported(Sequence& s, const KvExportRange& range, ExportedKv kv) {
  if (!s.export_status.ok()) {
    return;  // this transfer already failed: its later layers go nowhere
  }
  LayerSlice slice;
  slice.layer = kv.layer;
  slice.first_token = range.first_token;
  slice.token_count = range.count;
  slice.k = kv.k;
  slice.v = kv.v;
  slice.dtype = backend_->kv_store().layout().dtype;
  slice.keep_alive = std::move(kv.keep_alive);
  if (absl::Status st = s.kv_export->SendLayer(std::move(slice)); !st.ok()) {
    s.export_status = st;
  }
}

bool Engine::EnsureBlocks(Sequence& s, int64_t tokens) {
  const int64_t need = (tokens + pool_->block_size() - 1) / pool_->block_size();
  const int64_t have = static_cast<int64_t>(s.blocks.size());
  if (need <= have) {
    return true;
  }
  auto fresh = pool_->Allocate(static_cast<int32_t>(need - have));
  if (!fresh.ok()) {
    return false;
  }
  s.blocks.insert(s.blocks.end(), fresh->begin(), fresh->end());
  return true;
}

void Engine::Preempt(Sequence& s) {
  // Recompute later: the tokens stay, the KV goes (its full blocks may survive in the prefix
  // cache and be matched again on restart).
  ReleaseBlocks(s);
}

void Engine::PublishFullBlocks(Sequence& s) {
  if (!options_.enable_prefix_cache) {
    return;
  }
  const int32_t bs = pool_->block_size();
  const size_t full = static_cast<size_t>(s.num_computed / bs);
  while (s.hashes.size() < full) {
    const size_t i = s.hashes.size();
    const BlockHash parent = i == 0 ? prefix_seed_ : s.hashes[i - 1];
    s.hashes.push_back(HashBlock(parent, std::span<const int32_t>(s.tokens).subspan(i * bs, bs)));
  }
  for (; s.published < full; ++s.published) {
    pool_->Publish(s.blocks[s.published], s.hashes[s.published]);
  }
}

absl::StatusOr<std::vector<TokenEvent>> Engine::Step(StepStats* stats) {
  std::vector<TokenEvent> events = std::move(pending_events_);
  pending_events_.clear();
  StepStats st;
  std::vector<SequenceChunk> chunks;
  std::vector<Sequence*> chunk_seq;
  int32_t budget = options_.max_batch_tokens;
  const int32_t bs = pool_->block_size();
  for (auto& s : seqs_) s->scheduled = false;

  // 1. Decodes: every started sequence whose prompt is fully computed feeds its last token.
  for (size_t i = 0; i < seqs_.size() && budget > 0; ++i) {
    Sequence& s = *seqs_[i];
    if (!s.started || s.num_computed + 1 != static_cast<int64_t>(s.tokens.size())) {
      continue;
    }
    while (!EnsureBlocks(s, s.num_computed + 1)) {
      // Out of blocks: preempt the newest started sequence not yet in this step.
      Sequence* victim = nullptr;
      for (size_t j = seqs_.size(); j-- > 0;) {
        if (seqs_[j]->started && !seqs_[j]->scheduled) {
          victim = seqs_[j].get();
          break;
        }
      }
      if (victim == nullptr) {
        break;
      }
      Preempt(*victim);
      ++st.preempted;
      if (victim == &s) {
        break;
      }
    }
    if (!s.started) {
      continue;
    }
    if (static_cast<int64_t>(s.blocks.size()) * bs < s.num_computed + 1) {
      continue;  // no block could be found; it waits
    }
    s.scheduled = true;
    chunks.push_back(SequenceChunk{std::span<const int32_t>(&s.tokens[s.num_computed], 1),
                                   s.num_computed, s.blocks, true});
    chunk_seq.push_back(&s);
    --budget;
    ++st.decode_tokens;
  }

  // 2. Prefill chunks, first come first served, within the token budget.
  int32_t started = 0;
  for (auto& sp : seqs_) started += sp->started ? 1 : 0;
  for (size_t i = 0; i < seqs_.size() && budget > 0; ++i) {
    Sequence& s = *seqs_[i];
    if (s.scheduled) {
      continue;
    }
    const int64_t total = static_cast<int64_t>(s.tokens.size());
    if (s.started && s.num_computed + 1 == total) {
      continue;  // a decode that could not get a block
    }
    if (!s.started) {
      if (started >= options_.max_num_seqs) {
        break;
      }
      // Prefix cache: reuse full blocks of tokens[0, total - 1) (the last token must run).
      if (options_.enable_prefix_cache) {
        const auto hashes = HashFullBlocks(
            std::span<const int32_t>(s.tokens.data(), total - 1), bs, prefix_seed_);
        s.blocks = pool_->MatchPrefix(hashes);
        s.num_computed = static_cast<int64_t>(s.blocks.size()) * bs;
        s.hashes.assign(hashes.begin(), hashes.begin() + s.blocks.size());
        s.published = s.blocks.size();
      }
      if (s.cached_tokens < 0) {
        s.cached_tokens = static_cast<int32_t>(s.num_computed);
      }
      s.started = true;
      ++started;
    }
    int64_t n = std::min<int64_t>(total - s.num_computed, budget);
    if (!EnsureBlocks(s, s.num_computed + n)) {
      // Take what the blocks we can still get hold.
      const int64_t free_tokens =
          (static_cast<int64_t>(s.blocks.size()) + pool_->num_free_blocks()) * bs - s.num_computed;
      n = std::min(n, free_tokens);
      if (n <= 0 || !EnsureBlocks(s, s.num_computed + n)) {
        if (s.num_computed == 0 || s.blocks.empty()) {
          ReleaseBlocks(s);  // back to waiting
          --started;
        }
        break;
      }
    }
    s.scheduled = true;
    const bool last = s.num_computed + n == total;
    chunks.push_back(SequenceChunk{std::span<const int32_t>(&s.tokens[s.num_computed], n),
                                   s.num_computed, s.blocks, last});
    chunk_seq.push_back(&s);
    budget -= static_cast<int32_t>(n);
    st.prefill_tokens += static_cast<int32_t>(n);
  }

  if (chunks.empty()) {
    if (stats) *stats = st;
    if (seqs_.empty()) {
      return events;
    }
    // Partially prefilled sequences hold every block and none can go on: keep the oldest, send
    // the rest back to recompute later, and try once more. Add() guarantees that one sequence
    // alone fits in the pool.
    bool preempted = false;
    for (size_t i = 1; i < seqs_.size(); ++i) {
      if (seqs_[i]->started) {
        Preempt(*seqs_[i]);
        preempted = true;
      }
    }
    if (preempted) {
      auto more = Step(stats);
      if (!more.ok()) {
        return more;
      }
      events.insert(events.end(), std::make_move_iterator(more->begin()),
                    std::make_move_iterator(more->end()));
      return events;
    }
    // Blocks held outside the engine (a decode worker's reservations for KV still landing) can
    // be what is missing: then the sequences wait for them to come back.
    std::unordered_set<BlockId> held;  // distinct: prefix-cache hits share blocks
    for (const auto& sp : seqs_) held.insert(sp->blocks.begin(), sp->blocks.end());
    if (static_cast<int64_t>(held.size()) + pool_->num_free_blocks() < pool_->num_blocks()) {
      return events;
    }
    return absl::InternalError("no sequence can be scheduled although the pool should fit one");
  }

  // Block tables may have grown since the spans were taken: refresh them.
  for (size_t i = 0; i < chunks.size(); ++i) chunks[i].block_table = chunk_seq[i]->blocks;

  // Rows whose sampling is a plain greedy pick: a backend that can keeps them on the device and
  // returns 8 bytes each; here the same PickGreedy runs on the host row otherwise.
  const int64_t V = model_->config.vocab_size;
  const bool backend_picks = backend_->ReturnsPicks();
  int64_t n_logits = 0;
  int64_t n_picks = 0;
  use_pick_.assign(chunks.size(), 0);
  for (size_t i = 0; i < chunks.size(); ++i) {
    SequenceChunk& c = chunks[i];
    if (!c.want_logits) continue;
    const Sequence& s = *chunk_seq[i];
    const bool banned_any = s.num_output() < s.params.min_tokens && !s.banned.empty();
    use_pick_[i] = !s.want_prompt_logits &&
                   PickSuffices(s.resolved, banned_any, s.params.logprobs);
    c.pick = backend_picks && use_pick_[i];
    (c.pick ? n_picks : n_logits) += 1;
  }
  logits_.resize(static_cast<size_t>(n_logits) * V);
  picks_.resize(static_cast<size_t>(n_picks));
  ForwardBatch batch;
  batch.chunks = chunks;
  batch.picks = picks_;
  // KV export: every token of an exporting sequence not sent yet, up to the end of its chunk
  // (prefix-cache hits included); nothing for a recomputation after a preemption.
  exports_.clear();
  export_seq_.clear();
  for (size_t i = 0; i < chunks.size(); ++i) {
    Sequence& s = *chunk_seq[i];
    if (s.kv_export == nullptr || !s.export_status.ok()) {
      continue;
    }
    const int64_t end = chunks[i].start_pos + static_cast<int64_t>(chunks[i].tokens.size());
    if (end > s.exported) {
      exports_.push_back(KvExportRange{static_cast<int32_t>(i), s.exported, end - s.exported});
      export_seq_.push_back(&s);
    }
  }
  const KvExportCallback send_exported = [this](ExportedKv kv) {
    const size_t r = static_cast<size_t>(kv.range);
    SendExported(*export_seq_[r], exports_[r], std::move(kv));
  };
  if (!exports_.empty()) {
    batch.exports = exports_;
    batch.on_kv_export = &send_exported;
  }
  if (absl::Status s = backend_->Forward(batch, logits_); !s.ok()) {
    return s;
  }

  int64_t row = 0;
  int64_t pick_row = 0;
  for (size_t i = 0; i < chunks.size(); ++i) {
    Sequence& s = *chunk_seq[i];
    s.num_computed += static_cast<int64_t>(chunks[i].tokens.size());
    s.exported = std::max(s.exported, s.kv_export ? s.num_computed : 0);
    PublishFullBlocks(s);
    if (!s.export_status.ok() && s.finish == FinishReason::kNone) {
      s.finish = FinishReason::kAbort;
      TokenEvent ev;
      ev.seq = s.id;
      ev.finish = s.finish;
      ev.status = s.export_status;
      events.push_back(std::move(ev));
    }
    if (!chunks[i].want_logits) {
      continue;
    }
    std::span<float> lg;
    TokenPick pick;
    if (chunks[i].pick) {
      pick = picks_[pick_row++];
    } else {
      lg = std::span<float>(&logits_[row * V], V);
      ++row;
    }
    if (s.finish != FinishReason::kNone) {
      continue;
    }
    TokenEvent ev;
    ev.seq = s.id;
    ev.cached_tokens = std::max(0, s.cached_tokens);
    if (s.want_prompt_logits) {
      ev.prompt_logits.assign(lg.begin(), lg.end());
      s.want_prompt_logits = false;
    }
    const bool below_min = s.num_output() < s.params.min_tokens;
    if (s.params.seed) {
      // One stream per output position: the same seed gives the same tokens whichever worker
      // samples a position (disaggregated prefill, re-admission after a failure).
      s.rng = Rng(*s.params.seed + 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(s.num_output()));
    }
    SampledToken t;
    if (use_pick_[i]) {
      if (!chunks[i].pick) pick = PickGreedy(lg);
      t.token = pick.token;
      t.logprob = s.params.logprobs >= 0 ? pick.logprob : 0.0f;
    } else {
      t = SampleToken(lg, s.resolved, s.history,
                      below_min ? std::span<const int32_t>(s.banned) : std::span<const int32_t>(),
                      s.params.logprobs, s.rng, scratch_);
    }
    ProcessSampled(s, t, ev);
    ++st.sampled;
    ev.finish = s.finish;
    s.handed_off = s.prefill_only;
    events.push_back(std::move(ev));
  }

  // Finished (or handed-off) sequences leave and return their blocks.
  for (auto it = seqs_.begin(); it != seqs_.end();) {
    if ((*it)->finish != FinishReason::kNone || (*it)->handed_off) {
      ReleaseBlocks(**it);
      it = seqs_.erase(it);
    } else {
      ++it;
    }
  }
  if (stats) *stats = st;
  return events;
}

void Engine::ProcessSampled(Sequence& s, const SampledToken& t, TokenEvent& ev) {
  s.tokens.push_back(t.token);
  s.history.AddOutput(t.token);
  ev.token = t.token;
  ev.index = s.num_output() - 1;
  ev.logprob = t.logprob;
  ev.top_logprobs = t.top_logprobs;

  const bool is_eos = !s.params.ignore_eos &&
                      std::find(eos_ids_.begin(), eos_ids_.end(), t.token) != eos_ids_.end();
  const bool is_stop_id = std::find(s.params.stop_token_ids.begin(), s.params.stop_token_ids.end(),
                                    t.token) != s.params.stop_token_ids.end();
  if (is_eos || is_stop_id) {
    s.finish = FinishReason::kStop;
  }
  // Text: special tokens (EOS) are not part of it.
  if (s.text && s.finish == FinishReason::kNone) {
    bool stopped = false;
    ev.text = s.text->Push(t.token, &stopped);
    if (stopped) {
      s.finish = FinishReason::kStop;
      return;
    }
  }
  if (s.finish == FinishReason::kNone &&
      (s.num_output() >= s.params.max_tokens ||
       static_cast<int64_t>(s.tokens.size()) >= max_model_len_)) {
    s.finish = FinishReason::kLength;
  }
  if (s.text && s.finish != FinishReason::kNone) {
    ev.text += s.text->Finish(s.finish == FinishReason::kLength);
  }
}

absl::StatusOr<GenerateResult> Engine::Generate(SequenceRequest request) {
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  auto id = Add(std::move(request));
  if (!id.ok()) {
    return id.status();
  }
  GenerateResult r;
  Clock::time_point first{};
  bool done = false;
  while (!done) {
    auto events = Step();
    if (!events.ok()) {
      Abort(*id);
      return events.status();
    }
    for (TokenEvent& ev : *events) {
      if (ev.seq != *id) continue;
      if (r.output_ids.empty()) first = Clock::now();
      r.output_ids.push_back(ev.token);
      r.logprobs.push_back(ev.logprob);
      r.text += ev.text;
      if (!ev.prompt_logits.empty()) r.prompt_logits = std::move(ev.prompt_logits);
      if (ev.finish != FinishReason::kNone) {
        r.finish = ev.finish;
        done = true;
      }
    }
  }
  const auto t1 = Clock::now();
  r.prefill_seconds = std::chrono::duration<double>(first - t0).count();
  r.decode_seconds = std::chrono::duration<double>(t1 - first).count();
  return r;
}

}  // namespace tandem
