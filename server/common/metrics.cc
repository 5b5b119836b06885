// Prometheus metrics: see metrics.h. Bucket boundaries follow vLLM's where it has the metric,
// extended with finer low buckets so a small model's millisecond latencies stay visible.
#include "server/common/metrics.h"

#include <dirent.h>
#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/text_serializer.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <unistd.h>

#include <boost/asio.hpp>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/synchronization/mutex.h"

namespace tandem {
namespace {

using prometheus::Histogram;

// vLLM's TTFT buckets.
const Histogram::BucketBoundaries kTtftBuckets = {
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,  0.25,  0.5,   0.75,
    1.0,   2.5,   5.0,  7.5,  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0};
// vLLM's inter-token / per-output-token buckets, with 1, 2.5 and 5 ms in front.
const Histogram::BucketBoundaries kTokenBuckets = {
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1,  0.15, 0.2, 0.3,
    0.4,   0.5,    0.75,  1.0,  2.5,   5.0,  7.5,   10.0, 20.0, 40.0, 80.0};
// vLLM's request-level buckets (E2E, queue, prefill), with 1 ms to 100 ms in front.
const Histogram::BucketBoundaries kRequestBuckets = {
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,  0.1,   0.3,   0.5,   0.8,   1.0,    1.5,   2.0, 2.5,
    5.0,   10.0,   15.0,  20.0, 30.0,  40.0,  50.0,  60.0,  120.0, 240.0, 480.0,  960.0, 1920.0,
    7680.0};
const Histogram::BucketBoundaries kTransferBuckets = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                                     0.05,   0.1,   0.25,   0.5,   1.0,  2.5,
                                                     5.0,    10.0,  30.0,   60.0};
// vLLM's iteration-token buckets.
const Histogram::BucketBoundaries kBatchTokenBuckets = {1,   8,    16,   32,   64,   128,  256,
                                                        512, 1024, 2048, 4096, 8192, 16384};
const Histogram::BucketBoundaries kBatchSizeBuckets = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512};

prometheus::Histogram* AddHistogram(prometheus::Registry& r, const std::string& name,
                                    const std::string& help, const prometheus::Labels& labels,
                                    const Histogram::BucketBoundaries& buckets) {
  return &prometheus::BuildHistogram().Name(name).Help(help).Register(r).Add(labels, buckets);
}
prometheus::Counter* AddCounter(prometheus::Registry& r, const std::string& name,
                                const std::string& help, const prometheus::Labels& labels) {
  return &prometheus::BuildCounter().Name(name).Help(help).Register(r).Add(labels);
}
prometheus::Gauge* AddGauge(prometheus::Registry& r, const std::string& name,
                            const std::string& help, const prometheus::Labels& labels) {
  return &prometheus::BuildGauge().Name(name).Help(help).Register(r).Add(labels);
}

}  // namespace

// process_* metrics as the Prometheus client libraries of other languages export them.
class ProcessCollector : public prometheus::Collectable {
 public:
  ProcessCollector() {
    std::ifstream stat("/proc/self/stat");
    std::string line;
    std::getline(stat, line);
    const auto fields = Fields(line);
    const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
    double boot = 0;
    std::ifstream s("/proc/stat");
    for (std::string l; std::getline(s, l);) {
      if (l.rfind("btime ", 0) == 0) boot = std::stod(l.substr(6));
    }
    start_time_ = fields.size() > 19 ? boot + std::stod(fields[19]) / ticks : 0;
  }

  std::vector<prometheus::MetricFamily> Collect() const override {
    std::ifstream stat("/proc/self/stat");
    std::string line;
    std::getline(stat, line);
    const auto f = Fields(line);
    const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
    const double page = static_cast<double>(sysconf(_SC_PAGESIZE));
    std::vector<prometheus::MetricFamily> out;
    if (f.size() > 21) {
      out.push_back(One("process_cpu_seconds_total", "User and system CPU time in seconds.",
                        prometheus::MetricType::Counter,
                        (std::stod(f[11]) + std::stod(f[12])) / ticks));
      out.push_back(One("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                        prometheus::MetricType::Gauge, std::stod(f[20])));
      out.push_back(One("process_resident_memory_bytes", "Resident memory size in bytes.",
                        prometheus::MetricType::Gauge, std::stod(f[21]) * page));
    }
    out.push_back(One("process_start_time_seconds", "Start time since the Unix epoch in seconds.",
                      prometheus::MetricType::Gauge, start_time_));
    double fds = 0;
    if (DIR* d = opendir("/proc/self/fd")) {
      while (dirent* e = readdir(d)) fds += e->d_name[0] != '.' ? 1 : 0;
      closedir(d);
    }
    out.push_back(One("process_open_fds", "Number of open file descriptors.",
                      prometheus::MetricType::Gauge, fds));
    return out;
  }

 private:
  // Fields of /proc/self/stat after the command name (which may hold spaces), so that index i
  // is field i + 3 of proc(5).
  static std::vector<std::string> Fields(const std::string& line) {
    std::vector<std::string> out;
    const size_t close = line.rfind(')');
    if (close == std::string::npos) return out;
    std::istringstream ss(line.substr(close + 2));
    for (std::string t; ss >> t;) out.push_back(t);
    return out;
  }
  static prometheus::MetricFamily One(const std::string& name, const std::string& help,
                                      prometheus::MetricType type, double value) {
    prometheus::MetricFamily fam;
    fam.name = name;
    fam.help = help;
    fam.type = type;
    prometheus::ClientMetric m;
    if (type == prometheus::MetricType::Counter) {
      m.counter.value = value;
    } else {
      m.gauge.value = value;
    }
    fam.metric.push_back(m);
    return fam;
  }

  double start_time_ = 0;
};

// Router gauges computed at scrape time from a snapshot function.
class RouterViewCollector : public prometheus::Collectable {
 public:
  void Set(const std::string& model, std::function<RouterSnapshot()> source) {
    absl::MutexLock l(&mu_);
    model_ = model;
    source_ = std::move(source);
  }

  std::vector<prometheus::MetricFamily> Collect() const override {
    absl::MutexLock l(&mu_);
    if (!source_) {
      return {};
    }
    const RouterSnapshot snap = source_();
    auto family = [](const char* name, const char* help) {
      prometheus::MetricFamily f;
      f.name = name;
      f.help = help;
      f.type = prometheus::MetricType::Gauge;
      return f;
    };
    auto add = [](prometheus::MetricFamily& f, std::vector<prometheus::ClientMetric::Label> labels,
                  double v) {
      prometheus::ClientMetric m;
      m.label = std::move(labels);
      m.gauge.value = v;
      f.metric.push_back(std::move(m));
    };
    std::vector<prometheus::MetricFamily> out;
    struct Field {
      const char* name;
      const char* help;
      double RouterSnapshot::Worker::*value;
    };
    static const Field kFields[] = {
        {"tandem_worker_running_sequences", "Sequences holding KV on the worker (its last report).",
         &RouterSnapshot::Worker::running},
        {"tandem_worker_queued_prefill_tokens", "Prompt tokens queued on the worker (its last report).",
         &RouterSnapshot::Worker::queued_prefill_tokens},
        {"tandem_worker_kv_blocks_free", "Free KV blocks on the worker (its last report).",
         &RouterSnapshot::Worker::free_blocks},
        {"tandem_worker_kv_blocks_capacity", "KV blocks of the worker's pool.",
         &RouterSnapshot::Worker::total_blocks},
    };
    prometheus::MetricFamily up = family("tandem_worker_up", "1 when the router considers the worker usable, else 0.");
    for (const auto& w : snap.workers) {
      add(up, {{"model", model_}, {"role", w.role}, {"worker", w.name}}, w.up ? 1 : 0);
    }
    out.push_back(std::move(up));
    for (const Field& fd : kFields) {
      prometheus::MetricFamily f = family(fd.name, fd.help);
      for (const auto& w : snap.workers) {
        add(f, {{"model", model_}, {"role", w.role}, {"worker", w.name}}, w.*fd.value);
      }
      out.push_back(std::move(f));
    }
    return out;
  }

 private:
  mutable absl::Mutex mu_;
  std::string model_;
  std::function<RouterSnapshot()> source_;
};

void MetricsEndpoint::SetRouterView(const std::string& model,
                                    std::function<RouterSnapshot()> source) {
  router_view_->Set(model, std::move(source));
}

// GET /metrics over HTTP/1.1, one response per connection. One I/O thread; a client that sends
// nothing is dropped after 10 s. Rendering happens on the I/O thread at request time.
class HttpMetricsServer {
 public:
  using Render = std::function<std::string()>;

  HttpMetricsServer(Render render) : render_(std::move(render)), acceptor_(io_) {}
  ~HttpMetricsServer() {
    io_.stop();
    if (thread_.joinable()) thread_.join();
  }

  absl::Status Listen(const std::string& host, int port) {
    boost::system::error_code ec;
    const auto addr = boost::asio::ip::make_address(host, ec);
    if (ec) {
      return absl::InvalidArgumentError("metrics bind address '" + host + "': " + ec.message());
    }
    const boost::asio::ip::tcp::endpoint ep(addr, static_cast<uint16_t>(port));
    acceptor_.open(ep.protocol(), ec);
    if (!ec) acceptor_.set_option(boost::asio::socket_base::reuse_address(true), ec);
    if (!ec) acceptor_.bind(ep, ec);
    if (!ec) acceptor_.listen(boost::asio::socket_base::max_listen_connections, ec);
    if (ec) {
      return absl::UnavailableError("cannot serve metrics on " + host + ":" +
                                    std::to_string(port) + ": " + ec.message());
    }
    port_ = acceptor_.local_endpoint().port();
    Accept();
    thread_ = std::thread([this] { io_.run(); });
    return absl::OkStatus();
  }
  int port() const { return port_; }

 private:
  struct Connection : std::enable_shared_from_this<Connection> {
    Connection(boost::asio::ip::tcp::socket s, const Render& r)
        : socket(std::move(s)), timer(socket.get_executor()), render(r) {}
    void Start() {
      auto self = shared_from_this();
      timer.expires_after(std::chrono::seconds(10));
      timer.async_wait([self](const boost::system::error_code& ec) {
        if (!ec) self->socket.close();
      });
      boost::asio::async_read_until(
          socket, request, "\r\n\r\n", [self](const boost::system::error_code& ec, size_t) {
            if (ec) {
              self->timer.cancel();
              return;
            }
            std::istream in(&self->request);
            std::string method, target;
            in >> method >> target;
            std::string body, status = "200 OK";
            if (method != "GET") {
              status = "405 Method Not Allowed";
            } else if (target != "/metrics" && target.rfind("/metrics?", 0) != 0) {
              status = "404 Not Found";
              body = "try /metrics\n";
            } else {
              body = self->render();
            }
            self->response = "HTTP/1.1 " + status +
                             "\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8"
                             "\r\nContent-Length: " + std::to_string(body.size()) +
                             "\r\nConnection: close\r\n\r\n" + body;
            boost::asio::async_write(self->socket, boost::asio::buffer(self->response),
                                     [self](const boost::system::error_code&, size_t) {
                                       boost::system::error_code ignored;
                                       self->socket.shutdown(
                                           boost::asio::ip::tcp::socket::shutdown_both, ignored);
                                       self->socket.close(ignored);
                                       self->timer.cancel();
                                     });
          });
    }
    boost::asio::ip::tcp::socket socket;
    boost::asio::steady_timer timer;
    boost::asio::streambuf request{16 << 10};  // bounded: a request line + headers
    std::string response;
    const Render& render;
  };

  void Accept() {
    acceptor_.async_accept([this](const boost::system::error_code& ec,
                                  boost::asio::ip::tcp::socket s) {
      if (ec) {
        if (ec == boost::asio::error::operation_aborted) return;
      } else {
        std::make_shared<Connection>(std::move(s), render_)->Start();
      }
      Accept();
    });
  }

  Render render_;
  boost::asio::io_context io_;
  boost::asio::ip::tcp::acceptor acceptor_;
  std::thread thread_;
  int port_ = 0;
};

absl::StatusOr<std::unique_ptr<MetricsEndpoint>> MetricsEndpoint::Start(
    const std::string& bind_address, int port) {
  if (port < 0 || port > 65535) {
    return absl::InvalidArgumentError("--metrics-port must be in [0, 65535]");
  }
  std::unique_ptr<MetricsEndpoint> m(new MetricsEndpoint());
  m->host_ = bind_address;
  m->registry_ = std::make_shared<prometheus::Registry>();
  m->process_ = std::make_shared<ProcessCollector>();
  m->router_view_ = std::make_shared<RouterViewCollector>();
  MetricsEndpoint* self = m.get();
  m->http_ = std::make_unique<HttpMetricsServer>([self] {
    std::vector<prometheus::MetricFamily> families = self->registry_->Collect();
    for (const prometheus::Collectable* c :
         {static_cast<const prometheus::Collectable*>(self->process_.get()),
          static_cast<const prometheus::Collectable*>(self->router_view_.get())}) {
      auto more = c->Collect();
      families.insert(families.end(), std::make_move_iterator(more.begin()),
                      std::make_move_iterator(more.end()));
    }
    return prometheus::TextSerializer().Serialize(families);
  });
  if (absl::Status st = m->http_->Listen(bind_address, port); !st.ok()) {
    return st;
  }
  m->port_ = m->http_->port();
  return m;
}

MetricsEndpoint::~MetricsEndpoint() { http_.reset(); }

std::string MetricsEndpoint::address() const {
  const std::string host = host_ == "0.0.0.0" || host_.empty() ? "127.0.0.1" : host_;
  return host + ":" + std::to_string(port_);
}

const char* RequestOutcomeName(RequestOutcome o) {
  switch (o) {
    case RequestOutcome::kSuccess:
      return "success";
    case RequestOutcome::kInvalidArgument:
      return "invalid_argument";
    case RequestOutcome::kResourceExhausted:
      return "resource_exhausted";
    case RequestOutcome::kUnavailable:
      return "unavailable";
    case RequestOutcome::kDeadlineExceeded:
      return "deadline_exceeded";
    case RequestOutcome::kCancelled:
      return "cancelled";
    case RequestOutcome::kInternal:
      return "internal";
  }
  return "internal";
}

RouterMetrics::RouterMetrics(prometheus::Registry& r, const std::string& model) {
  const prometheus::Labels m{{"model", model}};
  ttft_ = AddHistogram(r, "tandem_time_to_first_token_seconds",
                       "Time from request arrival to its first token, seen at the router.", m,
                       kTtftBuckets);
  itl_ = AddHistogram(r, "tandem_inter_token_latency_seconds",
                      "Time between consecutive tokens of a request, seen at the router.", m,
                      kTokenBuckets);
  tpot_ = AddHistogram(r, "tandem_request_time_per_output_token_seconds",
                       "Per request: (end - first token) / (output tokens - 1).", m,
                       kTokenBuckets);
  e2e_ = AddHistogram(r, "tandem_e2e_request_latency_seconds",
                      "Time from request arrival to its last token.", m, kRequestBuckets);
  queue_ = AddHistogram(r, "tandem_request_queue_time_seconds",
                        "Time a request waited for admission before its first dispatch.", m,
                        kRequestBuckets);
  prompt_tokens_ = AddCounter(r, "tandem_prompt_tokens_total", "Prompt tokens of admitted requests.", m);
  generation_tokens_ =
      AddCounter(r, "tandem_generation_tokens_total", "Tokens streamed to clients.", m);
  readmissions_ = AddCounter(r, "tandem_request_readmissions_total",
                             "Requests dispatched again after a worker or transfer failure.", m);
  auto& outcomes = prometheus::BuildCounter()
                       .Name("tandem_requests_total")
                       .Help("Finished requests by outcome (the gRPC status class).")
                       .Register(r);
  for (int i = 0; i < kNumRequestOutcomes; ++i) {
    outcome_[i] = &outcomes.Add(
        {{"model", model}, {"outcome", RequestOutcomeName(static_cast<RequestOutcome>(i))}});
  }
  auto& fin = prometheus::BuildCounter()
                  .Name("tandem_request_success_total")
                  .Help("Requests that finished generating, by finish reason.")
                  .Register(r);
  const char* reasons[3] = {"stop", "length", "abort"};
  for (int i = 0; i < 3; ++i) finished_[i] = &fin.Add({{"model", model}, {"finished_reason", reasons[i]}});
  running_ = AddGauge(r, "tandem_num_requests_running",
                      "Requests running (router: dispatched to workers; worker: holding KV).",
                      {{"model", model}, {"role", "router"}});
  waiting_ = AddGauge(r, "tandem_num_requests_waiting",
                      "Requests waiting (router: for admission; worker: for KV or a batch slot).",
                      {{"model", model}, {"role", "router"}});
}

prometheus::Counter& RouterMetrics::finished(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop:
      return *finished_[0];
    case FinishReason::kLength:
      return *finished_[1];
    default:
      return *finished_[2];
  }
}

WorkerMetrics::WorkerMetrics(prometheus::Registry& r, const std::string& role,
                             const std::string& model) {
  const prometheus::Labels l{{"model", model}, {"role", role}};
  prefill_time_ = AddHistogram(r, "tandem_request_prefill_time_seconds",
                               "Per prompt: from admission on the worker to its first token.", l,
                               kRequestBuckets);
  kv_transfer_time_ = AddHistogram(
      r, "tandem_kv_transfer_seconds",
      "Per KV transfer: from the landing ticket (decode) or BEGIN (prefill) to its end.", l,
      kTransferBuckets);
  prefill_batch_tokens_ = AddHistogram(r, "tandem_prefill_batch_tokens",
                                       "Prompt tokens computed per engine step.", l,
                                       kBatchTokenBuckets);
  decode_batch_size_ = AddHistogram(r, "tandem_decode_batch_size",
                                    "Sequences decoding in one engine step.", l, kBatchSizeBuckets);
  kv_bytes_ = AddCounter(r, "tandem_kv_transfer_bytes_total",
                         "K and V payload bytes received (decode) or sent (prefill).", l);
  auto& transfers = prometheus::BuildCounter()
                        .Name("tandem_kv_transfers_total")
                        .Help("KV transfers by outcome.")
                        .Register(r);
  kv_ok_ = &transfers.Add({{"model", model}, {"role", role}, {"outcome", "ok"}});
  kv_failed_ = &transfers.Add({{"model", model}, {"role", role}, {"outcome", "failed"}});
  engine_prompt_tokens_ = AddCounter(r, "tandem_engine_prompt_tokens_total",
                                     "Prompt tokens computed by this worker's engine.", l);
  engine_generation_tokens_ = AddCounter(r, "tandem_engine_generation_tokens_total",
                                         "Tokens sampled by this worker's engine.", l);
  preemptions_ = AddCounter(r, "tandem_num_preemptions_total",
                            "Sequences preempted (their KV dropped, recomputed later).", l);
  prefix_queries_ = AddCounter(r, "tandem_prefix_cache_queries_total",
                               "Prompt KV blocks looked up in the prefix cache.", l);
  prefix_hits_ = AddCounter(r, "tandem_prefix_cache_hits_total",
                            "Prompt KV blocks found in the prefix cache.", l);
  blocks_used_ = AddGauge(r, "tandem_kv_cache_blocks_used", "KV blocks in use.", l);
  blocks_total_ = AddGauge(r, "tandem_kv_cache_blocks_capacity", "KV blocks of the pool.", l);
  usage_ = AddGauge(r, "tandem_kv_cache_usage_perc", "Fraction of KV blocks in use (0 to 1).", l);
  running_ = AddGauge(r, "tandem_num_requests_running",
                      "Requests running (router: dispatched to workers; worker: holding KV).", l);
  waiting_ = AddGauge(r, "tandem_num_requests_waiting",
                      "Requests waiting (router: for admission; worker: for KV or a batch slot).", l);
  queued_prefill_ = AddGauge(r, "tandem_queued_prefill_tokens",
                             "Prompt tokens admitted but not yet computed.", l);
}

void WorkerMetrics::UpdateLoad(const EngineLoad& load) {
  const double used = load.total_blocks - load.free_blocks;
  blocks_used_->Set(used);
  blocks_total_->Set(load.total_blocks);
  usage_->Set(load.total_blocks > 0 ? used / load.total_blocks : 0.0);
  running_->Set(load.running);
  waiting_->Set(load.waiting);
  queued_prefill_->Set(static_cast<double>(load.queued_prefill_tokens));
  if (load.prefix_queries > last_queries_) {
    prefix_queries_->Increment(static_cast<double>(load.prefix_queries - last_queries_));
    last_queries_ = load.prefix_queries;
  }
  if (load.prefix_hits > last_hits_) {
    prefix_hits_->Increment(static_cast<double>(load.prefix_hits - last_hits_));
    last_hits_ = load.prefix_hits;
  }
}

void WorkerMetrics::ObserveStep(const StepStats& stats) {
  if (stats.prefill_tokens > 0) {
    prefill_batch_tokens_->Observe(stats.prefill_tokens);
    engine_prompt_tokens_->Increment(stats.prefill_tokens);
  }
  if (stats.decode_tokens > 0) {
    decode_batch_size_->Observe(stats.decode_tokens);
  }
  if (stats.sampled > 0) {
    engine_generation_tokens_->Increment(stats.sampled);
  }
  if (stats.preempted > 0) {
    preemptions_->Increment(stats.preempted);
  }
}

}  // namespace tandem
