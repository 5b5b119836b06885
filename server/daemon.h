// The serving subcommands of `tandem`: router, prefill, decode, serve (all roles in one
// process), and client. Each daemon binds its ports (0 = pick), prints one line with the bound
// addresses, serves until SIGTERM/SIGINT, then drains: health turns NOT_SERVING, new work is
// refused with UNAVAILABLE, in-flight requests get up to the grace period to finish.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "engine/engine.h"

namespace tandem {

// Flags shared by every daemon (one spelling everywhere, DESIGN §1); YAML keys in --config
// files are the flag names with '_' for '-'.
struct DaemonFlags {
  EngineOptions engine;          // model dir, backend, KV cache, batch limits
  std::string kv_dtype = "f32";
  int64_t kv_cache_mb = 512;
  bool no_prefix_cache = false;
  std::string model_name;        // served name; empty = the model folder's name
  std::string bind_address = "127.0.0.1";
  int grpc_port = 0;
  int metrics_port = 0;          // Prometheus /metrics (0: pick a free port; -1: none)
  int http_port = -1;            // router, serve: OpenAI-compatible HTTP (0: pick; -1: off)
  std::string chat_template;     // router, serve: chat template file (or text); empty: the model's
  // Workers.
  std::string router;            // router address to register with; empty = static only
  std::string name;              // worker name; empty = its gRPC address
  int kv_port = 0;               // decode: data-plane port
  std::string kv_advertise_host; // decode: host put in landing tickets
  std::string kv_secret;         // data-plane HELLO secret (both worker roles)
  int transfer_timeout_ms = 30000;
  // Router.
  std::vector<std::string> prefill_workers;  // static lists (polled through Worker.GetInfo)
  std::vector<std::string> decode_workers;
  int max_running = 256;
  int max_queued = 1024;
  int max_attempts = 3;
  int request_timeout_ms = 0;
  int heartbeat_interval_ms = 500;
  int missed_heartbeats = 3;
  bool colocated = false;        // decode workers prefill locally; prefill workers unused
  // Drain.
  double drain_grace_s = 30;
};

// Converts the KV flags into engine options; INVALID_ARGUMENT naming the flag.
absl::Status ResolveEngineFlags(DaemonFlags& flags);

int RunRouter(const DaemonFlags& flags);
int RunPrefill(const DaemonFlags& flags);
int RunDecode(const DaemonFlags& flags);
int RunServe(const DaemonFlags& flags);

struct ClientFlags {
  std::string router = "127.0.0.1:50051";
  std::optional<std::string> prompt;
  std::vector<int32_t> token_ids;
  SamplingParams sampling;
  bool max_tokens_set = false;
  bool add_special = true;
  bool json = false;       // one JSON object per response message, then a summary object
  double timeout_s = 300;
  std::string model;
};

// Streams one Generate call and prints the text as it arrives. Exit code 0 on success, 1 on an
// RPC error (printed with its status code), 2 on bad flags.
int RunClient(const ClientFlags& flags);

}  // namespace tandem
