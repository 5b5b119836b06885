// The `tandem` binary: command-line parsing for every subcommand (CLI11 stays in this file).
#include <CLI/CLI.hpp>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cstdio>
#include <string>

#include "engine/version.h"
#include "server/daemon.h"
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
  cmd->add_option("--kv-memory-fraction", e.kv_memory_fraction,
                  "GPU backends: KV pool = this fraction of the device memory free after the "
                  "weights (replaces --kv-cache-mb; 0: off)")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_flag("!--gpu-fast-activations", e.gpu_exact_activations,
                "GPU backends, bf16/f16 weights: bf16 compute (faster prefill) instead of "
                "~fp32-exact activations into the GEMMs");
  cmd->add_flag("--cuda-graphs", e.gpu_graphs,
                "cuda backend: replay greedy decode steps as CUDA graphs (experimental)");
  cmd->add_option("--threads", e.num_threads, "CPU threads (0: all)")->capture_default_str();
  cmd->add_option("--max-batch-tokens", e.max_batch_tokens, "Tokens per step")
      ->capture_default_str();
  cmd->add_option("--max-num-seqs", e.max_num_seqs, "Sequences holding KV at once")
      ->capture_default_str();
  cmd->add_option("--max-model-len", e.max_model_len, "Context length (0: the model's)");
  cmd->add_flag("--no-prefix-cache", no_prefix_cache, "Disable the prefix cache");
}

// --config FILE.yaml for the daemons: a YAML map whose keys are the flag names with '_' or '-'
// (`grpc_port: 0`, `decode_worker: [a:1, b:2]`). Its entries become flags placed before the
// command line's, and every scalar daemon option keeps its last value, so the command line wins.
bool YamlToArgs(const std::string& path, std::vector<std::string>* args, std::string* error) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::Exception& e) {
    *error = "--config " + path + ": " + e.what();
    return false;
  }
  if (root.IsNull()) {
    return true;
  }
  if (!root.IsMap()) {
    *error = "--config " + path + ": the file must be a YAML map of flag: value";
    return false;
  }
  for (const auto& kv : root) {
    std::string name = kv.first.as<std::string>();
    std::replace(name.begin(), name.end(), '_', '-');
    const YAML::Node& v = kv.second;
    if (v.IsSequence()) {
      for (const auto& e : v) {
        args->push_back("--" + name);
        args->push_back(e.as<std::string>());
      }
    } else if (v.IsScalar()) {
      const std::string value = v.as<std::string>();
      if (value == "true" || value == "false") {
        if (value == "true") args->push_back("--" + name);  // a flag
      } else {
        args->push_back("--" + name);
        args->push_back(value);
      }
    } else {
      *error = "--config " + path + ": '" + name + "' must be a value or a list";
      return false;
    }
  }
  return true;
}

// Expands `tandem <daemon> ... --config FILE ...` into the YAML's flags followed by the rest.
bool ExpandConfig(int argc, char** argv, std::vector<std::string>* out, std::string* error) {
  out->assign(argv, argv + argc);
  if (argc < 2) {
    return true;
  }
  const std::string sub = argv[1];
  if (sub != "serve" && sub != "router" && sub != "prefill" && sub != "decode") {
    return true;
  }
  std::vector<std::string> rest, from_file;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    std::string path;
    if (a == "--config" && i + 1 < argc) {
      path = argv[++i];
    } else if (a.rfind("--config=", 0) == 0) {
      path = a.substr(9);
    } else {
      rest.push_back(a);
      continue;
    }
    if (!YamlToArgs(path, &from_file, error)) {
      return false;
    }
  }
  out->assign(argv, argv + 2);
  out->insert(out->end(), from_file.begin(), from_file.end());
  out->insert(out->end(), rest.begin(), rest.end());
  return true;
}

void AddDaemonFlags(CLI::App* cmd, tandem::DaemonFlags& d, bool router, bool worker) {
  // Read by ExpandConfig before parsing; declared here for --help.
  static std::string config_file;
  cmd->add_option("--config", config_file, "YAML file of flag: value (the command line wins)");
  cmd->add_option("--model-name", d.model_name, "Served model name (default: folder name)");
  cmd->add_option("--bind", d.bind_address, "Address to listen on")->capture_default_str();
  cmd->add_option("--grpc-port", d.grpc_port, "gRPC port (0: pick a free one)")
      ->capture_default_str();
  cmd->add_option("--drain-grace-s", d.drain_grace_s, "Seconds in-flight work gets on SIGTERM")
      ->capture_default_str();
  cmd->add_option("--metrics-port", d.metrics_port,
                  "Prometheus /metrics port (0: pick a free one, -1: off)")
      ->capture_default_str();
  if (worker) {
    cmd->add_option("--router", d.router, "Router address to register with");
    cmd->add_option("--name", d.name, "Worker name (default: its gRPC address)");
    cmd->add_option("--kv-port", d.kv_port, "Decode: KV data-plane port (0: pick)");
    cmd->add_option("--kv-advertise-host", d.kv_advertise_host,
                    "Decode: host prefill workers dial (default: --bind)");
    cmd->add_option("--kv-secret", d.kv_secret, "Shared data-plane HELLO secret");
    cmd->add_option("--transfer-timeout-ms", d.transfer_timeout_ms,
                    "Decode: how long a landing ticket waits for its KV")
        ->capture_default_str();
  }
  if (router) {
    cmd->add_option("--http-port", d.http_port,
                    "OpenAI-compatible HTTP port (0: pick a free one, -1: off)")
        ->capture_default_str();
    cmd->add_option("--chat-template", d.chat_template,
                    "Chat template for /v1/chat/completions: a Jinja file, or the template "
                    "itself (default: the model's tokenizer_config.json)");
    cmd->add_option("--prefill-worker", d.prefill_workers, "Static prefill worker (repeatable)")
        ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
    cmd->add_option("--decode-worker", d.decode_workers, "Static decode worker (repeatable)")
        ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
    cmd->add_option("--max-running", d.max_running, "Requests dispatched at once")
        ->capture_default_str();
    cmd->add_option("--max-queued", d.max_queued, "Requests waiting; beyond: RESOURCE_EXHAUSTED")
        ->capture_default_str();
    cmd->add_option("--max-attempts", d.max_attempts, "Dispatch attempts per request")
        ->capture_default_str();
    cmd->add_option("--request-timeout-ms", d.request_timeout_ms, "0: the client's deadline only");
    cmd->add_option("--heartbeat-interval-ms", d.heartbeat_interval_ms, "Worker heartbeat period")
        ->capture_default_str();
    cmd->add_option("--missed-heartbeats", d.missed_heartbeats, "Then a worker is evicted")
        ->capture_default_str();
    cmd->add_flag("--colocated", d.colocated, "Decode workers prefill locally");
  }
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

  // Daemons.
  tandem::DaemonFlags serve_f, router_f, prefill_f, decode_f;
  auto* serve = app.add_subcommand("serve", "All roles in one process (router + prefill + decode)");
  auto* router = app.add_subcommand("router", "Front door: gRPC API, admission, scheduling");
  auto* prefill = app.add_subcommand("prefill", "Prefill worker: prompts, KV sent to decode");
  auto* decode = app.add_subcommand("decode", "Decode worker: KV receiver, continuous batching");
  struct DaemonCmd {
    CLI::App* cmd;
    tandem::DaemonFlags* flags;
    bool router;
    bool worker;
  };
  const DaemonCmd daemons[] = {{serve, &serve_f, true, true},
                               {router, &router_f, true, false},
                               {prefill, &prefill_f, false, true},
                               {decode, &decode_f, false, true}};
  for (const DaemonCmd& d : daemons) {
    // A value from --config comes first; the command line's later one wins.
    d.cmd->option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
    AddEngineFlags(d.cmd, d.flags->engine, d.flags->kv_dtype, d.flags->kv_cache_mb,
                   d.flags->no_prefix_cache);
    AddDaemonFlags(d.cmd, *d.flags, d.router, d.worker);
  }
  serve_f.grpc_port = 50051;

  tandem::ClientFlags cl;
  auto* client = app.add_subcommand("client", "Send one streaming Generate request to a router");
  client->add_option("--router", cl.router, "Router address")->capture_default_str();
  client->add_option("--model", cl.model, "Model name (default: the served one)");
  std::string cl_prompt;
  auto* cl_prompt_opt = client->add_option("--prompt", cl_prompt, "Prompt text");
  auto* cl_ids_opt =
      client->add_option("--token-ids", cl.token_ids, "Prompt token ids")->delimiter(',');
  cl_prompt_opt->excludes(cl_ids_opt);
  bool cl_no_special = false;
  client->add_flag("--no-special", cl_no_special, "Do not add BOS when tokenizing --prompt");
  AddSamplingFlags(client, cl.sampling);
  client->add_flag("--json", cl.json, "One JSON object per message, then a summary");
  client->add_option("--timeout-s", cl.timeout_s, "Deadline")->capture_default_str();

  std::vector<std::string> args;
  std::string config_error;
  if (!ExpandConfig(argc, argv, &args, &config_error)) {
    std::fprintf(stderr, "error: %s\n", config_error.c_str());
    return 2;
  }
  std::vector<char*> expanded;
  for (std::string& a : args) expanded.push_back(a.data());
  CLI11_PARSE(app, static_cast<int>(expanded.size()), expanded.data());

  for (const DaemonCmd& d : daemons) {
    if (!d.cmd->parsed()) continue;
    if (absl::Status st = tandem::ResolveEngineFlags(*d.flags); !st.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(st.message()).c_str());
      return 2;
    }
    if (d.cmd == serve) return tandem::RunServe(*d.flags);
    if (d.cmd == router) return tandem::RunRouter(*d.flags);
    if (d.cmd == prefill) return tandem::RunPrefill(*d.flags);
    return tandem::RunDecode(*d.flags);
  }
  if (client->parsed()) {
    if (!cl_prompt.empty()) cl.prompt = cl_prompt;
    cl.add_special = !cl_no_special;
    cl.max_tokens_set = client->get_option("--max-tokens")->count() > 0;
    return tandem::RunClient(cl);
  }

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
