// The `tandem` binary: command-line parsing for every subcommand (CLI11 stays in this file).
#include <CLI/CLI.hpp>

#include <cstdio>
#include <string>

#include "engine/version.h"
#include "server/offline_commands.h"

#ifndef TANDEM_DEFAULT_MODEL_DIR
#define TANDEM_DEFAULT_MODEL_DIR "configs/demo-model"
#endif

namespace {

void AddEngineFlags(CLI::App* cmd, tandem::EngineOptions& e, std::string& kv_dtype,
                    int64_t& kv_cache_mb, bool& no_prefix_cache) {
  e.model_dir = TANDEM_DEFAULT_MODEL_DIR;
  cmd->add_option("--model", e.model_dir, "Hugging Face model folder (default: the demo model)");
  cmd->add_option("--backend", e.backend, "cpu, cuda or hip")->capture_default_str();
  cmd->add_option("--block-size", e.block_size, "KV block size in tokens")->capture_default_str();
  cmd->add_option("--kv-dtype", kv_dtype, "KV cache dtype: f32, bf16 or f16")->capture_default_str();
  cmd->add_option("--kv-cache-mb", kv_cache_mb, "KV cache size in MiB")->capture_default_str();
  cmd->add_option("--num-kv-blocks", e.num_kv_blocks, "KV blocks (overrides --kv-cache-mb)");
  cmd->add_option("--threads", e.num_threads, "CPU threads (0: all)")->capture_default_str();
  cmd->add_option("--max-batch-tokens", e.max_batch_tokens, "Tokens per step")
      ->capture_default_str();
  cmd->add_option("--max-model-len", e.max_model_len, "Context length (0: the model's)");
  cmd->add_flag("--no-prefix-cache", no_prefix_cache, "Disable the prefix cache");
}

void AddSamplingFlags(CLI::App* cmd, tandem::SamplingParams& s) {
  cmd->add_option("--max-tokens", s.max_tokens, "Tokens to generate")->capture_default_str();
  cmd->add_option("--min-tokens", s.min_tokens, "Tokens before EOS/stop ids are allowed");
  cmd->add_option("--temperature", s.temperature, "0 = greedy (default: generation_config)");
  cmd->add_option("--top-p", s.top_p, "Nucleus sampling mass in (0, 1]");
  cmd->add_option("--top-k", s.top_k, "Top-k (-1: off)");
  cmd->add_option("--min-p", s.min_p, "Min-p in [0, 1]");
  cmd->add_option("--repetition-penalty", s.repetition_penalty, "> 0, 1 = off");
  cmd->add_option("--presence-penalty", s.presence_penalty, "[-2, 2]");
  cmd->add_option("--frequency-penalty", s.frequency_penalty, "[-2, 2]");
  cmd->add_option("--seed", s.seed, "Seed for reproducible sampling");
  cmd->add_option("--stop", s.stop, "Stop string (repeatable)");
  cmd->add_option("--stop-token-ids", s.stop_token_ids, "Stop token ids")->delimiter(',');
  cmd->add_flag("--ignore-eos", s.ignore_eos, "Keep generating past EOS");
  cmd->add_option("--logprobs", s.logprobs, "Top-N logprobs per token (0: chosen only)");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Tandem: disaggregated prefill/decode LLM serving"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("tandem ") + tandem::Version());

  tandem::GenerateFlags gen;
  std::string gen_kv_dtype = "f32";
  int64_t gen_kv_mb = 512;
  bool gen_no_prefix = false;
  std::string gen_prompt;
  auto* generate = app.add_subcommand("generate", "Run one prompt through the engine (offline)");
  AddEngineFlags(generate, gen.engine, gen_kv_dtype, gen_kv_mb, gen_no_prefix);
  auto* prompt_opt = generate->add_option("--prompt", gen_prompt, "Prompt text");
  auto* ids_opt =
      generate->add_option("--token-ids", gen.token_ids, "Prompt token ids")->delimiter(',');
  prompt_opt->excludes(ids_opt);
  generate->add_flag("--no-special", gen.no_special, "Do not add BOS when tokenizing --prompt");
  AddSamplingFlags(generate, gen.sampling);
  generate->add_flag("--json", gen.json, "Print one JSON object");
  generate->add_flag("--logits", gen.logits, "With --json: include last_prompt_logits");

  tandem::TokenizeFlags tok;
  tok.model_dir = TANDEM_DEFAULT_MODEL_DIR;
  auto* tokenize = app.add_subcommand("tokenize", "Encode text with a model's tokenizer");
  tokenize->add_option("--model", tok.model_dir, "Folder with tokenizer.json");
  tokenize->add_option("--text", tok.text, "Text to encode")->required();
  tokenize->add_flag("--add-special", tok.add_special, "Add special tokens (BOS)");
  tokenize->add_flag("--json", tok.json, "Print {\"ids\": [...]}");

  tandem::MakeModelFlags mk;
  auto* make_model =
      app.add_subcommand("make-model", "Write a model folder with deterministic random weights");
  make_model->add_option("--preset", mk.preset, "demo, qwen2.5-0.5b, llama-3.2-1b, llama-3-8b")
      ->capture_default_str();
  make_model->add_option("--out", mk.out, "Output folder")->required();
  make_model->add_option("--dtype", mk.dtype, "bf16, f16 or f32")->capture_default_str();
  make_model->add_option("--architecture", mk.architecture, "Override the architecture");
  make_model->add_option("--seed", mk.seed, "Weight seed")->capture_default_str();
  make_model->add_option("--layers", mk.layers, "Override the layer count");

  CLI11_PARSE(app, argc, argv);

  if (generate->parsed()) {
    if (gen_prompt.empty() && gen.token_ids.empty()) {
      std::fprintf(stderr, "error: generate needs --prompt or --token-ids\n");
      return 2;
    }
    if (!gen_prompt.empty()) gen.prompt = gen_prompt;
    auto dt = tandem::ParseDType(gen_kv_dtype);
    if (!dt) {
      std::fprintf(stderr, "error: --kv-dtype must be f32, bf16 or f16\n");
      return 2;
    }
    gen.engine.kv_dtype = *dt;
    gen.engine.kv_cache_bytes = gen_kv_mb << 20;
    gen.engine.enable_prefix_cache = !gen_no_prefix;
    gen.engine.max_num_seqs = 1;
    return tandem::RunGenerate(gen);
  }
  if (tokenize->parsed()) {
    return tandem::RunTokenize(tok);
  }
  if (make_model->parsed()) {
    return tandem::RunMakeModel(mk);
  }
  return 2;
}
