// Prometheus metrics of every role. The names, types and labels are a public contract
// (docs/metrics.md); where vLLM has an equivalent, the meaning and buckets are vLLM's.
// Handles are resolved once at construction: recording on a hot path is an atomic add, with no
// map lookup or allocation. Labels stay low-cardinality (model, role, worker, outcome, reason).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/engine.h"

namespace prometheus {
class Counter;
class Gauge;
class Histogram;
class Registry;
template <typename T>
class Family;
}  // namespace prometheus

namespace tandem {

// The router's state as read at scrape time (no bookkeeping on the request path).
struct RouterSnapshot {
  struct Worker {
    std::string name;
    std::string role;  // "prefill" or "decode"
    bool up = false;
    double running = 0;
    double queued_prefill_tokens = 0;
    double free_blocks = 0;
    double total_blocks = 0;
  };
  std::vector<Worker> workers;
};

// The /metrics HTTP endpoint of one process, with process metrics (CPU, memory, fds, start
// time) included. A small Boost.Asio HTTP/1.1 server rather than prometheus-cpp's civetweb
// exposer: civetweb fails to start ("null context") in a process that has CUDA's libcublasLt
// loaded, i.e. in every CUDA-enabled build.
class MetricsEndpoint {
 public:
  // Binds `bind_address:port` (port 0: pick one).
  static absl::StatusOr<std::unique_ptr<MetricsEndpoint>> Start(const std::string& bind_address,
                                                                int port);
  ~MetricsEndpoint();
  prometheus::Registry& registry() { return *registry_; }
  int port() const { return port_; }
  std::string address() const;
  // Exposes the tandem_worker_* gauges, computed from `source` at every scrape. An empty function stops it (call that before the
  // router goes away).
  void SetRouterView(const std::string& model, std::function<RouterSnapshot()> source);

 private:
  MetricsEndpoint() = default;
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<class ProcessCollector> process_;
  std::shared_ptr<class RouterViewCollector> router_view_;
  std::unique_ptr<class HttpMetricsServer> http_;
  std::string host_;
  int port_ = 0;
};

// How a request ended, as the router reports it to the client.
enum class RequestOutcome {
  kSuccess,
  kInvalidArgument,
  kResourceExhausted,
  kUnavailable,
  kDeadlineExceeded,
  kCancelled,
  kInternal,
};
inline constexpr int kNumRequestOutcomes = 7;
const char* RequestOutcomeName(RequestOutcome o);

// Request-level metrics, measured at the router, where the client sees the latencies (a decode
// worker's own TTFT would start after the remote prefill and under-report).
class RouterMetrics {
 public:
  RouterMetrics(prometheus::Registry& registry, const std::string& model);

  prometheus::Histogram& ttft() { return *ttft_; }
  prometheus::Histogram& inter_token() { return *itl_; }
  prometheus::Histogram& time_per_output_token() { return *tpot_; }
  prometheus::Histogram& e2e() { return *e2e_; }
  prometheus::Histogram& queue_time() { return *queue_; }
  prometheus::Counter& prompt_tokens() { return *prompt_tokens_; }
  prometheus::Counter& generation_tokens() { return *generation_tokens_; }
  prometheus::Counter& readmissions() { return *readmissions_; }
  prometheus::Counter& outcome(RequestOutcome o) { return *outcome_[static_cast<int>(o)]; }
  // finish_reason "stop", "length", "abort".
  prometheus::Counter& finished(FinishReason r);
  // Admission state; set whenever it changes.
  prometheus::Gauge& running() { return *running_; }
  prometheus::Gauge& waiting() { return *waiting_; }

 private:
  prometheus::Histogram* ttft_;
  prometheus::Histogram* itl_;
  prometheus::Histogram* tpot_;
  prometheus::Histogram* e2e_;
  prometheus::Histogram* queue_;
  prometheus::Counter* prompt_tokens_;
  prometheus::Counter* generation_tokens_;
  prometheus::Counter* readmissions_;
  prometheus::Counter* outcome_[kNumRequestOutcomes];
  prometheus::Counter* finished_[3];
  prometheus::Gauge* running_;
  prometheus::Gauge* waiting_;
};

// Engine-side metrics of a prefill or decode worker.
class WorkerMetrics {
 public:
  // role: "prefill" or "decode".
  WorkerMetrics(prometheus::Registry& registry, const std::string& role, const std::string& model);

  prometheus::Histogram& prefill_time() { return *prefill_time_; }
  prometheus::Histogram& kv_transfer_time() { return *kv_transfer_time_; }
  prometheus::Histogram& prefill_batch_tokens() { return *prefill_batch_tokens_; }
  prometheus::Histogram& decode_batch_size() { return *decode_batch_size_; }
  prometheus::Counter& kv_bytes() { return *kv_bytes_; }
  prometheus::Counter& kv_transfers_ok() { return *kv_ok_; }
  prometheus::Counter& kv_transfers_failed() { return *kv_failed_; }
  prometheus::Counter& engine_prompt_tokens() { return *engine_prompt_tokens_; }
  prometheus::Counter& engine_generation_tokens() { return *engine_generation_tokens_; }
  prometheus::Counter& preemptions() { return *preemptions_; }

  // After every step (engine thread): gauges and the prefix-cache counters from a load snapshot.
  void UpdateLoad(const EngineLoad& load);
  // After every step: batch composition.
  void ObserveStep(const StepStats& stats);

 private:
  prometheus::Histogram* prefill_time_;
  prometheus::Histogram* kv_transfer_time_;
  prometheus::Histogram* prefill_batch_tokens_;
  prometheus::Histogram* decode_batch_size_;
  prometheus::Counter* kv_bytes_;
  prometheus::Counter* kv_ok_;
  prometheus::Counter* kv_failed_;
  prometheus::Counter* engine_prompt_tokens_;
  prometheus::Counter* engine_generation_tokens_;
  prometheus::Counter* preemptions_;
  prometheus::Counter* prefix_queries_;
  prometheus::Counter* prefix_hits_;
  prometheus::Gauge* blocks_used_;
  prometheus::Gauge* blocks_total_;
  prometheus::Gauge* usage_;
  prometheus::Gauge* running_;
  prometheus::Gauge* waiting_;
  prometheus::Gauge* queued_prefill_;
  int64_t last_queries_ = 0;
  int64_t last_hits_ = 0;
};

}  // namespace tandem
