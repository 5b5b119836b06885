// The scheduler-facing step API: sequences are added and removed; each Step() runs one forward
// pass over a mixed batch (prefill chunks + single-token decodes) on the paged KV cache, samples,
// and reports new tokens. Single-threaded: one owner thread (the worker's step loop) calls it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/model.h"
#include "engine/sampling.h"
#include "engine/tokenizer.h"
#include "kvcache/block_pool.h"
#include "kvcache/kv_sender.h"

namespace tandem {

struct EngineOptions {
  std::string model_dir;
  std::string backend = "cpu";
  int32_t block_size = 16;
  int32_t num_kv_blocks = 0;                // 0: as many as fit in kv_cache_bytes
  int64_t kv_cache_bytes = int64_t{512} << 20;
  // GPU backends: KV pool = this fraction of the device memory left free after the weights and
  // the activation workspace (vLLM's gpu_memory_utilization, applied to what is left); replaces
  // kv_cache_bytes when set. 0: off. The cpu backend refuses it.
  double kv_memory_fraction = 0;
  // GPU backends, bf16/f16 weights: ~fp32-exact activations into the GEMMs (true) or bf16
  // compute (false, faster prefill; see BackendOptions::gpu_exact_activations).
  bool gpu_exact_activations = true;
  // GPU backends: replay greedy decode steps as CUDA graphs (fewer launches per token). Off
  // until verified on a device.
  bool gpu_graphs = false;
  DType kv_dtype = DType::kF32;
  int num_threads = 0;                      // cpu: 0 = one per hardware thread
  int32_t max_batch_tokens = 2048;          // tokens in one step (prefill chunks + decodes)
  int32_t max_num_seqs = 256;               // sequences holding KV at once
  int64_t max_model_len = 0;                // 0: the model's max_position_embeddings
  bool enable_prefix_cache = true;
};

using SeqId = int64_t;

enum class FinishReason { kNone, kStop, kLength, kAbort };
const char* FinishReasonName(FinishReason r);  // "", "stop", "length", "abort"

struct SequenceRequest {
  std::vector<int32_t> prompt_ids;
  // Tokens already generated (re-admission after a worker failure): generation continues after
  // them; they count toward max_tokens/min_tokens and penalties see them as output.
  std::vector<int32_t> output_ids;
  SamplingParams sampling;
  bool want_prompt_logits = false;  // the first event carries the last prompt position's logits
  // Disaggregated prefill: compute prompt + output_ids, stream their KV layer by layer into
  // `kv_export` (not owned; must outlive the sequence; its spec's dtype is the KV store's dtype,
  // token_count = prompt + output ids, start_position 0), sample one token and leave. The caller
  // sends END (OutgoingTransfer::Finish) when the event arrives.
  bool prefill_only = false;
  OutgoingTransfer* kv_export = nullptr;
};

struct TokenEvent {
  SeqId seq = 0;
  int32_t token = -1;    // -1 when the sequence failed (see status)
  int32_t index = 0;     // position in the output (counting SequenceRequest::output_ids)
  float logprob = 0.0f;  // set when the request asked for logprobs
  std::vector<std::pair<int32_t, float>> top_logprobs;
  std::string text;      // newly completed text (tokenizer present), stop strings cut out
  FinishReason finish = FinishReason::kNone;
  std::vector<float> prompt_logits;
  int32_t cached_tokens = 0;  // on a sequence's first event: prompt tokens found in the prefix cache
  absl::Status status;        // not OK: the sequence failed (e.g. its KV export); finish is kAbort
};

// What a worker reports to the router.
struct EngineLoad {
  int64_t queued_prefill_tokens = 0;  // prompt tokens not computed yet
  int32_t running = 0;                // sequences holding KV
  int32_t waiting = 0;
  int32_t free_blocks = 0;
  int32_t total_blocks = 0;
  int64_t prefix_queries = 0;
  int64_t prefix_hits = 0;
};

struct StepStats {
  int32_t prefill_tokens = 0;
  int32_t decode_tokens = 0;
  int32_t preempted = 0;
  int32_t sampled = 0;  // tokens sampled in this step
};

struct GenerateResult {
  std::vector<int32_t> output_ids;
  std::vector<float> logprobs;
  std::string text;
  FinishReason finish = FinishReason::kNone;
  std::vector<float> prompt_logits;
  double prefill_seconds = 0;  // until the first token
  double decode_seconds = 0;   // the rest
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);
  ~Engine();

  // Validates and queues a sequence. INVALID_ARGUMENT names the field (empty prompt, ids outside
  // the vocabulary, prompt or prompt + max_tokens past the context, sampling values);
  // RESOURCE_EXHAUSTED when the sequence could never fit in the KV pool.
  absl::StatusOr<SeqId> Add(SequenceRequest request);
  // The checks Add() makes, without adding.
  absl::Status Validate(const SequenceRequest& request) const;
  // Adds a sequence whose KV for prompt + output_ids arrived from a prefill worker, with the
  // token it sampled. `blocks` (table covering those tokens, first block first) carry one
  // reference that passes to the engine, also on error. The first token's event comes out of
  // the next Step() (it may already finish the sequence).
  absl::StatusOr<SeqId> AddPrefilled(SequenceRequest request, std::vector<BlockId> blocks,
                                     int32_t first_token, float first_logprob);
  // Drops a sequence and frees its blocks. Unknown ids are ignored.
  void Abort(SeqId id);
  // Runs one step. Events for sequences that produced a token (finish set on their last).
  absl::StatusOr<std::vector<TokenEvent>> Step(StepStats* stats = nullptr);
  bool HasWork() const;
  size_t num_sequences() const;
  EngineLoad Load() const;

  // Offline helper: runs one request to completion (other queued sequences run along).
  absl::StatusOr<GenerateResult> Generate(SequenceRequest request);

  const ModelConfig& config() const { return model_->config; }
  const ModelWeights& model() const { return *model_; }
  const Tokenizer* tokenizer() const { return tokenizer_.get(); }  // null: ids only
  BlockPool& pool() { return *pool_; }
  Backend& backend() { return *backend_; }
  int64_t max_model_len() const { return max_model_len_; }
  const EngineOptions& options() const { return options_; }

 private:
  struct Sequence;
  Engine() = default;
  void Preempt(Sequence& s);
  bool EnsureBlocks(Sequence& s, int64_t tokens);
  void ReleaseBlocks(Sequence& s);
  void PublishFullBlocks(Sequence& s);
  void ProcessSampled(Sequence& s, const SampledToken& t, TokenEvent& ev);
  absl::StatusOr<std::unique_ptr<Sequence>> NewSequence(SequenceRequest& request);
  // Hands one layer of one sequence's KV (a backend's ExportedKv) to its outgoing transfer.
  void SendExported(Sequence& s, const KvExportRange& range, ExportedKv kv);

  EngineOptions options_;
  std::unique_ptr<ModelWeights> model_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<BlockPool> pool_;
  std::unique_ptr<Backend> backend_;
  int64_t max_model_len_ = 0;
  std::vector<int32_t> eos_ids_;
  uint64_t prefix_seed_ = 0;
  SeqId next_id_ = 1;
  std::vector<std::unique_ptr<Sequence>> seqs_;  // arrival order
  std::vector<float> logits_;
  std::vector<TokenPick> picks_;  // rows a GPU backend reduced to a greedy pick
  std::vector<char> use_pick_;    // per chunk of the step: a pick is all its sampling needs
  std::vector<KvExportRange> exports_;   // the step's KV export ranges
  std::vector<Sequence*> export_seq_;    // their sequences
  SamplerScratch scratch_;
  std::vector<TokenEvent> pending_events_;  // first tokens of AddPrefilled sequences
};

}  // namespace tandem
