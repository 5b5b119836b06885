// Worker identity helpers: see worker_info.h.
#include "server/common/worker_info.h"

#include <random>

namespace tandem {

uint64_t NewIncarnationId() {
  std::random_device rd;
  uint64_t id = 0;
  while (id == 0) {
    id = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }
  return id;
}

std::string AcceleratorVendor(const std::string& backend) {
  if (backend == "cuda") return "nvidia";
  if (backend == "hip") return "amd";
  return "cpu";
}

void EngineLoadToProto(const EngineLoad& load, internal::v1::WorkerLoad* out) {
  out->set_queued_prefill_tokens(load.queued_prefill_tokens);
  out->set_running_sequences(load.running);
  out->set_waiting_sequences(load.waiting);
  out->set_free_kv_blocks(load.free_blocks);
  out->set_total_kv_blocks(load.total_blocks);
  out->set_prefix_cache_queries(static_cast<uint64_t>(load.prefix_queries));
  out->set_prefix_cache_hits(static_cast<uint64_t>(load.prefix_hits));
}

}  // namespace tandem
