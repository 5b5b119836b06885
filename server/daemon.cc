// The serving subcommands: see daemon.h.
#include "server/daemon.h"

#include <grpcpp/grpcpp.h>
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "decode_worker/decode_worker.h"
#include "prefill_worker/prefill_worker.h"
#include "proto/convert.h"
#include "router/router.h"
#include "server/common/grpc_server.h"
#include "server/common/metrics.h"
#include "server/common/registration.h"
#include "server/http/openai_gateway.h"
#include "tandem/v1/tandem.grpc.pb.h"

namespace tandem {
namespace {

using Clock = std::chrono::steady_clock;

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
  return s.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

// Blocks the stop signals in this thread and every thread it starts afterwards, so that the
// daemon loop alone receives them (sigtimedwait) and no gRPC or engine thread is interrupted.
sigset_t BlockStopSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  return set;
}

// Waits up to `timeout` for a stop signal; true when one arrived.
bool WaitForSignal(const sigset_t& set, std::chrono::milliseconds timeout) {
  timespec ts;
  ts.tv_sec = timeout.count() / 1000;
  ts.tv_nsec = (timeout.count() % 1000) * 1000000;
  return sigtimedwait(&set, nullptr, &ts) > 0;
}

// What the daemon loop needs from one role in this process.
struct RoleHandle {
  std::string label;
  GrpcServer* server = nullptr;
  std::function<void()> start_drain;
  std::function<int()> in_flight;
  std::function<bool()> healthy;
  std::function<void()> shutdown;
};

// Serves until a stop signal, keeping grpc.health.v1 in step with the roles' own health (a
// stalled step loop turns the process NOT_SERVING), then drains and shuts down in order.
// The HTTP gateway (when on) stops taking connections at the drain and is stopped, cancelling
// what it still has in flight, before the gRPC servers and roles shut down.
int ServeUntilSignal(const sigset_t& signals, std::vector<RoleHandle>& roles,
                     std::vector<std::unique_ptr<RegistrationClient>>& registrations,
                     double grace_s, OpenAiGateway* http = nullptr) {
  bool serving = true;
  while (!WaitForSignal(signals, std::chrono::milliseconds(250))) {
    bool healthy = true;
    for (const RoleHandle& r : roles) healthy = healthy && r.healthy();
    if (healthy != serving) {
      serving = healthy;
      std::fprintf(stderr, "health: %s\n", serving ? "SERVING" : "NOT_SERVING (step loop stalled)");
      for (RoleHandle& r : roles) r.server->SetServing(serving);
    }
  }
  std::fprintf(stderr, "stop signal: draining (grace %.1f s)\n", grace_s);
  if (http != nullptr) http->StopAccepting();
  for (RoleHandle& r : roles) {
    r.server->SetServing(false);
    r.start_drain();
  }
  for (auto& reg : registrations) reg->Poke();  // tell the router now
  const auto deadline =
      Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(grace_s * 1000));
  for (;;) {
    int busy = 0;
    for (const RoleHandle& r : roles) busy += r.in_flight();
    if (busy == 0) {
      break;
    }
    if (Clock::now() >= deadline) {
      std::fprintf(stderr, "grace period over: cancelling %d request(s)\n", busy);
      break;
    }
    if (WaitForSignal(signals, std::chrono::milliseconds(50))) {
      std::fprintf(stderr, "second stop signal: cancelling what is left\n");
      break;
    }
  }
  registrations.clear();
  if (http != nullptr) http->Stop();
  for (RoleHandle& r : roles) r.server->Shutdown(std::chrono::milliseconds(500));
  for (RoleHandle& r : roles) r.shutdown();
  std::fprintf(stderr, "stopped\n");
  return 0;
}

std::string ModelName(const DaemonFlags& f) {
  if (!f.model_name.empty()) return f.model_name;
  std::filesystem::path p(f.engine.model_dir);
  if (!p.has_filename()) p = p.parent_path();
  return p.filename().string();
}

GrpcServerOptions ServerOptions(const DaemonFlags& f, int port) {
  GrpcServerOptions o;
  o.bind_address = f.bind_address;
  o.port = port;
  return o;
}

template <typename Worker>
RoleHandle Handle(const std::string& label, Worker& w, GrpcServer& server) {
  RoleHandle h;
  h.label = label;
  h.server = &server;
  h.start_drain = [&w] { w.StartDrain(); };
  h.in_flight = [&w] { return w.in_flight(); };
  h.healthy = [&w] { return w.Healthy(); };
  h.shutdown = [&w] { w.Shutdown(); };
  return h;
}

// The router has no step loop of its own: its health is its server's.
RoleHandle RouterHandle(Router& r, GrpcServer& server) {
  RoleHandle h;
  h.label = "router";
  h.server = &server;
  h.start_drain = [&r] { r.StartDrain(); };
  h.in_flight = [&r] { return r.in_flight(); };
  h.healthy = [] { return true; };
  h.shutdown = [&r] { r.Shutdown(); };
  return h;
}

template <typename Worker>
std::unique_ptr<RegistrationClient> Register(const std::string& router, Worker& w) {
  RegistrationOptions o;
  o.router_address = router;
  o.info = [&w] { return w.Info(); };
  o.load = [&w] { return w.Load(); };
  o.draining = [&w] { return w.draining(); };
  return std::make_unique<RegistrationClient>(std::move(o));
}

RouterOptions MakeRouterOptions(const DaemonFlags& f) {
  RouterOptions o;
  o.model_dir = f.engine.model_dir;
  o.model_name = ModelName(f);
  for (const std::string& a : f.prefill_workers) {
    o.static_workers.push_back({a, internal::v1::ROLE_PREFILL});
  }
  for (const std::string& a : f.decode_workers) {
    o.static_workers.push_back({a, internal::v1::ROLE_DECODE});
  }
  o.heartbeat_interval = std::chrono::milliseconds(f.heartbeat_interval_ms);
  o.missed_heartbeats = f.missed_heartbeats;
  o.max_running = f.max_running;
  o.max_queued = f.max_queued;
  o.max_attempts = f.max_attempts;
  o.request_timeout = std::chrono::milliseconds(f.request_timeout_ms);
  o.disaggregated = !f.colocated;
  return o;
}

DecodeWorkerOptions MakeDecodeOptions(const DaemonFlags& f) {
  DecodeWorkerOptions o;
  o.engine = f.engine;
  o.kv.bind_address = f.bind_address;
  o.kv.port = static_cast<uint16_t>(f.kv_port);
  o.kv_advertise_host = f.kv_advertise_host;
  o.hello_secret = f.kv_secret;
  o.name = f.name;
  o.model_name = ModelName(f);
  o.transfer_timeout = std::chrono::milliseconds(f.transfer_timeout_ms);
  return o;
}

PrefillWorkerOptions MakePrefillOptions(const DaemonFlags& f) {
  PrefillWorkerOptions o;
  o.engine = f.engine;
  o.kv.auth = f.kv_secret;
  o.name = f.name;
  o.model_name = ModelName(f);
  return o;
}

// Waits for the first registration so that the "ready" line means "reachable through the
// router" (tests and scripts rely on it).
void AwaitRegistration(const std::string& label, RegistrationClient& reg) {
  if (!reg.WaitRegistered(std::chrono::seconds(30))) {
    std::fprintf(stderr, "warning: %s not registered with the router yet (still trying)\n",
                 label.c_str());
  }
}

// The process's /metrics endpoint, or null when --metrics-port is -1.
absl::StatusOr<std::unique_ptr<MetricsEndpoint>> StartMetrics(const DaemonFlags& f) {
  if (f.metrics_port < 0) {
    return std::unique_ptr<MetricsEndpoint>();
  }
  return MetricsEndpoint::Start(f.bind_address, f.metrics_port);
}

// The router's per-worker gauges, read from its registry at every scrape.
void ExposeRouterView(MetricsEndpoint* m, const std::string& model, Router& router) {
  if (m == nullptr) {
    return;
  }
  m->SetRouterView(model, [&router] {
    RouterSnapshot snap;
    for (const WorkerView& w : router.Workers()) {
      RouterSnapshot::Worker s;
      s.name = w.info.name();
      s.role = w.info.role() == internal::v1::ROLE_PREFILL ? "prefill" : "decode";
      s.up = w.up && !w.draining;
      s.running = w.load.running_sequences();
      s.queued_prefill_tokens = static_cast<double>(w.load.queued_prefill_tokens());
      s.free_blocks = w.load.free_kv_blocks();
      s.total_blocks = w.load.total_kv_blocks();
      snap.workers.push_back(std::move(s));
    }
    return snap;
  });
}

std::string MetricsField(const std::unique_ptr<MetricsEndpoint>& m) {
  return m ? " metrics=" + m->address() : "";
}

// A special token of tokenizer_config.json: a string, or an AddedToken object's "content".
std::string SpecialTokenString(const nlohmann::json& config, const char* key) {
  const auto it = config.find(key);
  if (it == config.end()) return "";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) {
    return (*it)["content"].get<std::string>();
  }
  return "";
}

// The chat template for /v1/chat/completions: --chat-template (a file, or the template text
// itself when no such file exists; a bad one stops the daemon), else the model folder's
// tokenizer_config.json (a missing or unusable one only turns chat requests away, saying why).
absl::Status LoadChatTemplate(const DaemonFlags& f, OpenAiGatewayOptions& o) {
  nlohmann::json config = nlohmann::json::object();
  const std::filesystem::path config_path =
      std::filesystem::path(f.engine.model_dir) / "tokenizer_config.json";
  if (std::ifstream in(config_path); in) {
    config = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (!config.is_object()) config = nlohmann::json::object();
  }
  o.bos_token = SpecialTokenString(config, "bos_token");
  o.eos_token = SpecialTokenString(config, "eos_token");
  const std::string fix =
      "; start the server with --chat-template FILE (a Jinja chat template) to serve "
      "/v1/chat/completions, or render the prompt yourself and use /v1/completions";
  std::string source;
  if (!f.chat_template.empty()) {
    std::error_code ec;
    if (std::filesystem::is_regular_file(f.chat_template, ec)) {
      std::ifstream in(f.chat_template, std::ios::binary);
      source.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    } else {
      source = f.chat_template;
    }
    absl::StatusOr<ChatTemplate> parsed = ChatTemplate::Parse(source);
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--chat-template: ", parsed.status().message()));
    }
    o.chat_template = std::make_shared<ChatTemplate>(*std::move(parsed));
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> from_config = ChatTemplateFromTokenizerConfig(config);
  if (!from_config.ok()) {
    o.chat_unavailable = absl::StrCat("the model has no chat template (",
                                      from_config.status().message(), ")", fix);
    return absl::OkStatus();
  }
  absl::StatusOr<ChatTemplate> parsed = ChatTemplate::Parse(*from_config);
  if (!parsed.ok()) {
    o.chat_unavailable = absl::StrCat("the model's chat template cannot be used (",
                                      parsed.status().message(), ")", fix);
    std::fprintf(stderr, "warning: %s\n", o.chat_unavailable.c_str());
    return absl::OkStatus();
  }
  o.chat_template = std::make_shared<ChatTemplate>(*std::move(parsed));
  return absl::OkStatus();
}

// The OpenAI-compatible HTTP gateway, or null when --http-port is -1. It reaches the router
// through the router's own gRPC port: on loopback for a wildcard bind, else on the bound host.
absl::StatusOr<std::unique_ptr<OpenAiGateway>> StartHttp(const DaemonFlags& f, int grpc_port) {
  if (f.http_port < 0) {
    return std::unique_ptr<OpenAiGateway>();
  }
  OpenAiGatewayOptions o;
  o.bind_address = f.bind_address;
  o.port = f.http_port;
  std::string host = f.bind_address;
  if (host.empty() || host == "0.0.0.0" || host == "::") {
    host = "127.0.0.1";
  } else if (host.find(':') != std::string::npos) {
    host = "[" + host + "]";
  }
  o.router_address = absl::StrCat(host, ":", grpc_port);
  if (absl::Status st = LoadChatTemplate(f, o); !st.ok()) {
    return st;
  }
  return OpenAiGateway::Start(std::move(o));
}

std::string HttpField(const std::unique_ptr<OpenAiGateway>& h) {
  return h ? " http=" + h->address() : "";
}

void PrintReady(const std::string& line) {
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

}  // namespace

absl::Status ResolveEngineFlags(DaemonFlags& f) {
  const auto dt = ParseDType(f.kv_dtype);
  if (!dt) {
    return absl::InvalidArgumentError("--kv-dtype must be f32, bf16 or f16");
  }
  if (f.kv_cache_mb <= 0) {
    return absl::InvalidArgumentError("--kv-cache-mb must be positive");
  }
  if (f.grpc_port < 0 || f.grpc_port > 65535 || f.kv_port < 0 || f.kv_port > 65535) {
    return absl::InvalidArgumentError("--grpc-port and --kv-port must be in [0, 65535]");
  }
  if (f.http_port < -1 || f.http_port > 65535) {
    return absl::InvalidArgumentError("--http-port must be in [0, 65535], or -1 (off)");
  }
  if (f.drain_grace_s < 0) {
    return absl::InvalidArgumentError("--drain-grace-s must not be negative");
  }
  f.engine.kv_dtype = *dt;
  f.engine.kv_cache_bytes = f.kv_cache_mb << 20;
  f.engine.enable_prefix_cache = !f.no_prefix_cache;
  return absl::OkStatus();
}

int RunRouter(const DaemonFlags& f) {
  const sigset_t signals = BlockStopSignals();
  auto metrics = StartMetrics(f);
  if (!metrics.ok()) return Fail(metrics.status());
  std::unique_ptr<RouterMetrics> rm;
  RouterOptions ro = MakeRouterOptions(f);
  if (*metrics) {
    rm = std::make_unique<RouterMetrics>((*metrics)->registry(), ro.model_name);
    ro.metrics = rm.get();
  }
  auto router = Router::Create(ro);
  if (!router.ok()) return Fail(router.status());
  auto server = GrpcServer::Start(ServerOptions(f, f.grpc_port), (*router)->services());
  if (!server.ok()) return Fail(server.status());
  Router& r = **router;
  std::vector<RoleHandle> roles{RouterHandle(r, **server)};
  std::vector<std::unique_ptr<RegistrationClient>> regs;
  ExposeRouterView(metrics->get(), ro.model_name, r);
  auto http = StartHttp(f, (*server)->port());
  if (!http.ok()) return Fail(http.status());
  PrintReady(absl::StrCat("tandem router ready grpc=", (*server)->address(), MetricsField(*metrics),
                          HttpField(*http)));
  const int rc = ServeUntilSignal(signals, roles, regs, f.drain_grace_s, http->get());
  if (*metrics) (*metrics)->SetRouterView({}, nullptr);
  return rc;
}

namespace {

// One worker process: metrics, the worker, its gRPC server, registration, the ready line.
template <typename Worker, typename Options>
int RunWorker(const DaemonFlags& f, const std::string& role, Options options) {
  const sigset_t signals = BlockStopSignals();
  auto metrics = StartMetrics(f);
  if (!metrics.ok()) return Fail(metrics.status());
  std::unique_ptr<WorkerMetrics> wm;
  if (*metrics) {
    wm = std::make_unique<WorkerMetrics>((*metrics)->registry(), role, options.model_name);
    options.metrics = wm.get();
  }
  auto worker = Worker::Create(options);
  if (!worker.ok()) return Fail(worker.status());
  auto server = GrpcServer::Start(ServerOptions(f, f.grpc_port), (*worker)->services());
  if (!server.ok()) return Fail(server.status());
  (*worker)->SetGrpcAddress((*server)->address());
  std::vector<RoleHandle> roles{Handle(role, **worker, **server)};
  std::vector<std::unique_ptr<RegistrationClient>> regs;
  if (!f.router.empty()) {
    regs.push_back(Register(f.router, **worker));
    AwaitRegistration(role + " worker", *regs.back());
  }
  const std::string kv = (*worker)->Info().kv_address();
  PrintReady(absl::StrCat("tandem ", role, " ready grpc=", (*server)->address(),
                          kv.empty() ? "" : " kv=" + kv, MetricsField(*metrics)));
  return ServeUntilSignal(signals, roles, regs, f.drain_grace_s);
}

}  // namespace

int RunPrefill(const DaemonFlags& f) {
  return RunWorker<PrefillWorker>(f, "prefill", MakePrefillOptions(f));
}

int RunDecode(const DaemonFlags& f) {
  return RunWorker<DecodeWorker>(f, "decode", MakeDecodeOptions(f));
}

int RunServe(const DaemonFlags& f) {
  const sigset_t signals = BlockStopSignals();
  // Same code paths as the multi-process deployment: each role has its own gRPC server on
  // loopback, workers register with the router, KV moves over the TCP data plane.
  DaemonFlags local = f;
  local.bind_address = "127.0.0.1";
  // One /metrics endpoint for the process: router, prefill and decode metric sets, told apart
  // by their role label.
  auto metrics = StartMetrics(f);
  if (!metrics.ok()) return Fail(metrics.status());
  DecodeWorkerOptions dopt = MakeDecodeOptions(local);
  PrefillWorkerOptions popt = MakePrefillOptions(local);
  RouterOptions ropt = MakeRouterOptions(f);
  std::unique_ptr<WorkerMetrics> dm, pm;
  std::unique_ptr<RouterMetrics> rm;
  if (*metrics) {
    dm = std::make_unique<WorkerMetrics>((*metrics)->registry(), "decode", dopt.model_name);
    pm = std::make_unique<WorkerMetrics>((*metrics)->registry(), "prefill", popt.model_name);
    rm = std::make_unique<RouterMetrics>((*metrics)->registry(), ropt.model_name);
    dopt.metrics = dm.get();
    popt.metrics = pm.get();
    ropt.metrics = rm.get();
  }
  auto decode = DecodeWorker::Create(dopt);
  if (!decode.ok()) return Fail(decode.status());
  std::unique_ptr<PrefillWorker> prefill;
  if (!f.colocated) {
    auto p = PrefillWorker::Create(popt);
    if (!p.ok()) return Fail(p.status());
    prefill = *std::move(p);
  }
  auto router = Router::Create(ropt);
  if (!router.ok()) return Fail(router.status());
  auto router_server = GrpcServer::Start(ServerOptions(f, f.grpc_port), (*router)->services());
  if (!router_server.ok()) return Fail(router_server.status());
  auto decode_server = GrpcServer::Start(ServerOptions(local, 0), (*decode)->services());
  if (!decode_server.ok()) return Fail(decode_server.status());
  (*decode)->SetGrpcAddress((*decode_server)->address());
  std::unique_ptr<GrpcServer> prefill_server;
  if (prefill) {
    auto s = GrpcServer::Start(ServerOptions(local, 0), prefill->services());
    if (!s.ok()) return Fail(s.status());
    prefill_server = *std::move(s);
    prefill->SetGrpcAddress(prefill_server->address());
  }

  Router& r = **router;
  std::vector<RoleHandle> roles{RouterHandle(r, **router_server),
                                Handle("decode", **decode, **decode_server)};
  if (prefill) roles.push_back(Handle("prefill", *prefill, *prefill_server));

  // Workers reach the router through its loopback address even when it binds elsewhere.
  const std::string router_addr = absl::StrCat("127.0.0.1:", (*router_server)->port());
  std::vector<std::unique_ptr<RegistrationClient>> regs;
  regs.push_back(Register(router_addr, **decode));
  if (prefill) regs.push_back(Register(router_addr, *prefill));
  for (auto& reg : regs) AwaitRegistration("worker", *reg);
  ExposeRouterView(metrics->get(), ropt.model_name, r);
  auto http = StartHttp(f, (*router_server)->port());
  if (!http.ok()) return Fail(http.status());
  PrintReady(absl::StrCat("tandem serve ready grpc=", (*router_server)->address(),
                          " decode_grpc=", (*decode_server)->address(),
                          prefill ? " prefill_grpc=" + prefill_server->address() : "",
                          " kv=", (*decode)->Info().kv_address(), MetricsField(*metrics),
                          HttpField(*http)));
  const int rc = ServeUntilSignal(signals, roles, regs, f.drain_grace_s, http->get());
  if (*metrics) (*metrics)->SetRouterView({}, nullptr);
  return rc;
}

int RunClient(const ClientFlags& f) {
  if (!f.prompt && f.token_ids.empty()) {
    std::fprintf(stderr, "error: client needs --prompt or --token-ids\n");
    return 2;
  }
  auto stub = v1::Tandem::NewStub(
      grpc::CreateChannel(f.router, grpc::InsecureChannelCredentials()));
  v1::GenerateRequest req;
  req.set_model(f.model);
  if (f.prompt) {
    req.set_text(*f.prompt);
    req.set_add_special_tokens(f.add_special);
  } else {
    for (int32_t id : f.token_ids) req.mutable_token_ids()->add_ids(id);
  }
  SamplingToProto(f.sampling, req.mutable_sampling());
  if (!f.max_tokens_set) req.mutable_sampling()->clear_max_tokens();
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(f.timeout_s * 1000)));
  const auto t0 = Clock::now();
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse resp;
  int tokens = 0;
  double ttft_ms = -1;
  std::string finish;
  v1::Usage usage;
  while (reader->Read(&resp)) {
    if (tokens == 0 && resp.token_ids_size() > 0) {
      ttft_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    }
    tokens += resp.token_ids_size();
    if (f.json) {
      nlohmann::json j;
      j["token_ids"] = std::vector<int32_t>(resp.token_ids().begin(), resp.token_ids().end());
      j["text"] = resp.text();
      if (!resp.finish_reason().empty()) j["finish_reason"] = resp.finish_reason();
      std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    } else {
      std::fwrite(resp.text().data(), 1, resp.text().size(), stdout);
    }
    std::fflush(stdout);
    if (!resp.finish_reason().empty()) finish = resp.finish_reason();
    if (resp.has_usage()) usage = resp.usage();
  }
  const grpc::Status st = reader->Finish();
  const double total_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  if (!f.json) std::printf("\n");
  if (!st.ok()) {
    std::fprintf(stderr, "error: %s: %s\n", absl::StatusCodeToString(FromGrpcStatus(st).code()).c_str(),
                 st.error_message().c_str());
    return 1;
  }
  if (f.json) {
    nlohmann::json j;
    j["finish_reason"] = finish;
    j["prompt_tokens"] = usage.prompt_tokens();
    j["completion_tokens"] = usage.completion_tokens();
    j["cached_prompt_tokens"] = usage.cached_prompt_tokens();
    j["ttft_ms"] = ttft_ms;
    j["total_ms"] = total_ms;
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::fprintf(stderr, "[finish=%s prompt_tokens=%d completion_tokens=%d ttft=%.1f ms total=%.1f ms]\n",
                 finish.c_str(), usage.prompt_tokens(), usage.completion_tokens(), ttft_ms,
                 total_ms);
  }
  return 0;
}

}  // namespace tandem
