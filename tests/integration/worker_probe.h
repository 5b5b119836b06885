// Probes of running workers shared by the integration tests: wait for a worker's KV pool to be
// fully free, and scrape a /metrics endpoint.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "tandem/internal/v1/worker.grpc.pb.h"

namespace tandem::testing_util {

// Polls a worker's GetInfo until every KV block is free and it runs and queues nothing
// (bounded: 15 s). On failure `detail` says what the worker last reported.
inline bool AllBlocksFree(const std::string& addr, std::string* detail) {
  namespace iv1 = internal::v1;
  auto stub = iv1::Worker::NewStub(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(15);
  iv1::GetInfoResponse resp;
  while (std::chrono::steady_clock::now() < deadline) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    resp.Clear();
    if (stub->GetInfo(&ctx, iv1::GetInfoRequest(), &resp).ok() &&
        resp.load().free_kv_blocks() == resp.load().total_kv_blocks() &&
        resp.load().running_sequences() == 0 && resp.load().waiting_sequences() == 0) {
      return true;
    }
    // Polling a remote gauge: there is nothing to wait on across the process boundary.
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  *detail = addr + ": " + resp.load().ShortDebugString();
  return false;
}

// The text of http://addr/metrics (empty when it cannot be fetched).
inline std::string ScrapeMetrics(const std::string& addr) {
  std::string out;
  FILE* p = popen(("curl -s --max-time 10 http://" + addr + "/metrics").c_str(), "r");
  if (p == nullptr) return out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  pclose(p);
  return out;
}

}  // namespace tandem::testing_util
