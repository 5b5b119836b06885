// Observability end to end: `tandem serve` under a short load, scraped by a real Prometheus
// server (Debian's `prometheus`, loopback, temporary data dir). Every PromQL expression of the
// Grafana dashboard must return data, and `promtool check metrics` must accept /metrics.
#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <array>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "tandem/v1/tandem.grpc.pb.h"
#include "tests/integration/process.h"

namespace tandem {
namespace {

using testing_util::TandemProcess;
using json = nlohmann::json;

std::string Shell(const std::string& cmd, int* exit_code = nullptr) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return out;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  const int st = pclose(p);
  if (exit_code) *exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

json Query(const std::string& prom, const std::string& expr) {
  const std::string out = Shell("curl -s --max-time 10 --get --data-urlencode 'query=" + expr +
                              "' http://" + prom + "/api/v1/query");
  return json::parse(out, nullptr, false);
}

// Every "expr" of the dashboard, template variables replaced as Grafana would with "All".
std::vector<std::string> DashboardExpressions() {
  std::ifstream f(std::string(TANDEM_SOURCE_DIR) + "/deploy/grafana/tandem-dashboard.json");
  const json d = json::parse(f);
  std::vector<std::string> out;
  for (const auto& p : d["panels"]) {
    for (const auto& t : p["targets"]) {
      std::string e = t["expr"];
      e = std::regex_replace(e, std::regex(R"(\$__rate_interval)"), "20s");
      e = std::regex_replace(e, std::regex(R"(\$(model|worker|instance))"), ".*");
      out.push_back(e);
    }
  }
  return out;
}

TEST(MetricsTest, EveryDashboardQueryReturnsDataFromALiveServer) {
  if (Shell("command -v prometheus").empty() || Shell("command -v promtool").empty()) {
    GTEST_SKIP() << "prometheus/promtool not installed (Debian package `prometheus`)";
  }
  const auto tmp = std::filesystem::temp_directory_path() /
                   ("tandem-metrics-" + std::to_string(getpid()));
  std::filesystem::create_directories(tmp);
  TandemProcess serve({"serve", "--grpc-port", "0", "--metrics-port", "0", "--threads", "1",
                       "--kv-cache-mb", "32", "--drain-grace-s", "2"},
                      (tmp / "serve.log").string());
  ASSERT_TRUE(serve.WaitReady());
  const std::string metrics = serve.field("metrics");
  ASSERT_FALSE(metrics.empty());

  // A short load: streamed requests with a shared prefix (prefix-cache hits), one bad request.
  auto stub = v1::Tandem::NewStub(
      grpc::CreateChannel(serve.field("grpc"), grpc::InsecureChannelCredentials()));
  auto load = [&] {
    std::vector<std::thread> ts;
    for (int i = 0; i < 6; ++i) {
      ts.emplace_back([&, i] {
        v1::GenerateRequest r;
        r.set_text("The President said that the committee would meet again on " +
                   std::to_string(i));
        r.mutable_sampling()->set_max_tokens(12 + i);
        grpc::ClientContext ctx;
        auto reader = stub->Generate(&ctx, r);
        v1::GenerateResponse resp;
        while (reader->Read(&resp)) {
        }
        EXPECT_TRUE(reader->Finish().ok());
      });
    }
    for (auto& t : ts) t.join();
    v1::GenerateRequest bad;
    bad.set_text("x");
    bad.mutable_sampling()->set_top_p(2.0f);
    grpc::ClientContext ctx;
    auto reader = stub->Generate(&ctx, bad);
    v1::GenerateResponse resp;
    while (reader->Read(&resp)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  };
  load();

  // /metrics passes promtool's lint.
  int code = -1;
  const std::string lint =
      Shell("curl -s --max-time 10 http://" + metrics + "/metrics | promtool check metrics 2>&1", &code);
  EXPECT_EQ(code, 0) << lint;
  EXPECT_EQ(lint.find("problem"), std::string::npos) << lint;

  const int prom_port = FreePort();
  const std::string prom = "127.0.0.1:" + std::to_string(prom_port);
  {
    std::ofstream cfg(tmp / "prometheus.yml");
    cfg << "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        << "scrape_configs:\n  - job_name: tandem\n    static_configs:\n      - targets: ['"
        << metrics << "']\n";
  }
  const std::string prom_cmd = "prometheus --config.file=" + (tmp / "prometheus.yml").string() +
                               " --storage.tsdb.path=" + (tmp / "data").string() +
                               " --web.listen-address=" + prom + " >" +
                               (tmp / "prometheus.log").string() + " 2>&1 & echo $!";
  const int prom_pid = std::stoi(Shell(prom_cmd));
  struct Killer {
    int pid;
    ~Killer() { kill(pid, SIGKILL); }
  } killer{prom_pid};

  // Wait until Prometheus has scraped the target a few times, with more load in between so
  // rates see increases.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  int scrapes = 0;
  while (std::chrono::steady_clock::now() < deadline && scrapes < 4) {
    const json r = Query(prom, "count_over_time(up{job=\"tandem\"}[1m])");
    if (r.is_object() && r.value("status", "") == "success" && !r["data"]["result"].empty()) {
      scrapes = std::stoi(r["data"]["result"][0]["value"][1].get<std::string>());
    }
    if (scrapes == 2) load();
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  ASSERT_GE(scrapes, 4) << "Prometheus did not scrape " << metrics;
  const json up = Query(prom, "up{job=\"tandem\"}");
  ASSERT_EQ(up["data"]["result"][0]["value"][1], "1");

  for (const std::string& expr : DashboardExpressions()) {
    const json r = Query(prom, expr);
    ASSERT_TRUE(r.is_object()) << expr;
    EXPECT_EQ(r.value("status", ""), "success") << expr << "\n" << r.dump();
    EXPECT_FALSE(r["data"]["result"].empty()) << "no data for: " << expr;
  }
}

// The value of the first sample of `name` whose labels contain every `labels` pair; -1 if none.
double Sample(const std::string& text, const std::string& name,
              const std::vector<std::string>& labels = {}) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#' || line.compare(0, name.size(), name) != 0) continue;
    const char next = line.size() > name.size() ? line[name.size()] : ' ';
    if (next != '{' && next != ' ') continue;
    bool match = true;
    for (const std::string& l : labels) match = match && line.find(l) != std::string::npos;
    if (match) return std::stod(line.substr(line.rfind(' ') + 1));
  }
  return -1;
}

TEST(MetricsTest, CountersAndHistogramsMoveExactlyWithTheTraffic) {
  const auto tmp = std::filesystem::temp_directory_path() /
                   ("tandem-metrics-exact-" + std::to_string(getpid()));
  std::filesystem::create_directories(tmp);
  TandemProcess serve({"serve", "--grpc-port", "0", "--metrics-port", "0", "--threads", "1",
                       "--kv-cache-mb", "32", "--no-prefix-cache", "--drain-grace-s", "2"},
                      (tmp / "serve.log").string());
  ASSERT_TRUE(serve.WaitReady());
  auto stub = v1::Tandem::NewStub(
      grpc::CreateChannel(serve.field("grpc"), grpc::InsecureChannelCredentials()));
  constexpr int kN = 5, kM = 9;
  int prompt_tokens = 0;
  for (int i = 0; i < kN; ++i) {
    v1::GenerateRequest r;
    for (int t = 0; t <= i; ++t) r.mutable_token_ids()->add_ids(100 + 7 * t);
    prompt_tokens += i + 1;
    r.mutable_sampling()->set_max_tokens(kM);
    r.mutable_sampling()->set_ignore_eos(true);
    grpc::ClientContext ctx;
    auto reader = stub->Generate(&ctx, r);
    v1::GenerateResponse resp;
    while (reader->Read(&resp)) {
    }
    ASSERT_TRUE(reader->Finish().ok());
  }
  {
    v1::GenerateRequest bad;
    bad.mutable_token_ids()->add_ids(1);
    bad.mutable_sampling()->set_temperature(-1.0f);
    grpc::ClientContext ctx;
    auto reader = stub->Generate(&ctx, bad);
    v1::GenerateResponse resp;
    while (reader->Read(&resp)) {
    }
    ASSERT_EQ(reader->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  const std::string m = Shell("curl -s --max-time 10 http://" + serve.field("metrics") + "/metrics");
  EXPECT_EQ(Sample(m, "tandem_generation_tokens_total"), kN * kM);
  EXPECT_EQ(Sample(m, "tandem_prompt_tokens_total"), prompt_tokens);
  EXPECT_EQ(Sample(m, "tandem_requests_total", {"outcome=\"success\""}), kN);
  EXPECT_EQ(Sample(m, "tandem_requests_total", {"outcome=\"invalid_argument\""}), 1);
  EXPECT_EQ(Sample(m, "tandem_request_success_total", {"finished_reason=\"length\""}), kN);
  EXPECT_EQ(Sample(m, "tandem_time_to_first_token_seconds_count"), kN);
  EXPECT_EQ(Sample(m, "tandem_e2e_request_latency_seconds_count"), kN);
  EXPECT_EQ(Sample(m, "tandem_request_queue_time_seconds_count"), kN);
  EXPECT_EQ(Sample(m, "tandem_request_time_per_output_token_seconds_count"), kN);
  EXPECT_EQ(Sample(m, "tandem_inter_token_latency_seconds_count"), kN * (kM - 1));
  // Workers: every prompt went through one prefill and one KV transfer.
  EXPECT_EQ(Sample(m, "tandem_request_prefill_time_seconds_count", {"role=\"prefill\""}), kN);
  EXPECT_EQ(Sample(m, "tandem_kv_transfers_total", {"role=\"decode\"", "outcome=\"ok\""}), kN);
  EXPECT_GT(Sample(m, "tandem_kv_transfer_bytes_total", {"role=\"decode\""}), 0);
  EXPECT_EQ(Sample(m, "tandem_kv_transfer_bytes_total", {"role=\"decode\""}),
            Sample(m, "tandem_kv_transfer_bytes_total", {"role=\"prefill\""}));
  EXPECT_EQ(Sample(m, "tandem_engine_prompt_tokens_total", {"role=\"prefill\""}), prompt_tokens);
  // The decode side samples every token but the first of each request.
  EXPECT_EQ(Sample(m, "tandem_engine_generation_tokens_total", {"role=\"decode\""}),
            kN * (kM - 1));
  EXPECT_EQ(Sample(m, "tandem_num_requests_running", {"role=\"router\""}), 0);
  EXPECT_EQ(Sample(m, "tandem_kv_cache_blocks_used", {"role=\"decode\""}), 0);
  EXPECT_EQ(Sample(m, "tandem_worker_up", {"role=\"decode\""}), 1);
  EXPECT_GT(Sample(m, "process_resident_memory_bytes"), 0);
}

}  // namespace
}  // namespace tandem
