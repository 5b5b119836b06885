// Shared helpers for KV data-plane tests: a receiver (pool + host store + landing), random KV
// payloads in canonical layout, and checks of what landed.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <future>
#include <memory>
#include <random>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "kvcache/block_pool.h"
#include "kvcache/dtype.h"
#include "kvcache/kv_landing.h"
#include "kvcache/kv_sender.h"
#include "kvcache/kv_store.h"
#include "kvcache/wire_format.h"

namespace tandem::testing {

inline constexpr auto kWait = std::chrono::seconds(10);  // upper bound for any wait in a test

// One layer of canonical K and V for `tokens` tokens in `dtype`.
struct LayerData {
  std::vector<std::byte> k, v;
};

struct Payload {
  KvGeometry geometry;
  DType dtype = DType::kBF16;
  int64_t tokens = 0;
  std::vector<LayerData> layers;
  uint64_t token_bytes() const { return geometry.token_elems() * DTypeSize(dtype); }
};

// Random finite values in [-4, 4), stored in `dtype`.
inline Payload MakePayload(const KvGeometry& g, int64_t tokens, DType dtype, uint32_t seed) {
  Payload p;
  p.geometry = g;
  p.dtype = dtype;
  p.tokens = tokens;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-4.0f, 4.0f);
  const size_t n = static_cast<size_t>(tokens * g.token_elems());
  std::vector<float> f(n);
  for (int l = 0; l < g.num_layers; ++l) {
    LayerData d;
    d.k.resize(n * DTypeSize(dtype));
    d.v.resize(n * DTypeSize(dtype));
    for (auto& x : f) x = dist(rng);
    ConvertElements(DType::kF32, f.data(), dtype, d.k.data(), n);
    for (auto& x : f) x = dist(rng);
    ConvertElements(DType::kF32, f.data(), dtype, d.v.data(), n);
    p.layers.push_back(std::move(d));
  }
  return p;
}

// Pool + host store + landing of one receiver.
struct Receiver {
  Receiver(const KvGeometry& g, int32_t block_size, DType dtype, int32_t num_blocks,
           KvLandingOptions options = {})
      : pool(num_blocks, block_size),
        store(KvStoreLayout{g, block_size, dtype, num_blocks}),
        landing(pool, store, std::move(options)) {}

  bool AllFree() const {
    return pool.CheckInvariants().empty() && pool.num_free_blocks() == pool.num_blocks();
  }

  BlockPool pool;
  HostKvStore store;
  KvLanding landing;
};

// A transfer the test registered with a landing: the caller's table and the outcome future.
struct Expectation {
  uint64_t id = 0;
  TransferToken token{};
  std::vector<BlockId> table;  // the caller's own references
  int64_t start = 0;
  std::shared_ptr<std::promise<LandingOutcome>> promise;
  std::future<LandingOutcome> done;

  // Waits (bounded) for the landing's callback.
  LandingOutcome Wait() {
    if (done.wait_for(kWait) != std::future_status::ready) {
      ADD_FAILURE() << "transfer " << id << " did not complete within the test bound";
      return LandingOutcome{};
    }
    return done.get();
  }
};

inline TransferToken TokenFor(uint64_t id) {
  TransferToken t{};
  for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<uint8_t>((id * 131 + i * 7) & 0xff);
  return t;
}

inline constexpr uint64_t kFingerprint = 0x5eed'f00d'1234'5678ull;

// Reserves blocks for start + tokens (+ `extra_blocks`) and registers the transfer.
inline Expectation Expect(Receiver& r, uint64_t id, int64_t tokens, int64_t start = 0,
                          std::chrono::milliseconds timeout = std::chrono::seconds(30),
                          int extra_blocks = 0) {
  Expectation e;
  e.id = id;
  e.token = TokenFor(id);
  e.start = start;
  const int32_t bs = r.pool.block_size();
  const int32_t blocks = static_cast<int32_t>((start + tokens + bs - 1) / bs) + extra_blocks;
  auto table = r.pool.Allocate(blocks);
  EXPECT_TRUE(table.ok()) << table.status();
  if (!table.ok()) return e;
  e.table = *table;
  e.promise = std::make_shared<std::promise<LandingOutcome>>();
  e.done = e.promise->get_future();
  ExpectedTransfer spec;
  spec.transfer_id = id;
  spec.token = e.token;
  spec.model_fingerprint = kFingerprint;
  spec.geometry = r.store.layout().geometry;
  spec.token_count = tokens;
  spec.start_position = start;
  spec.block_table = e.table;
  spec.deadline = KvClock::now() + timeout;
  spec.on_done = [p = e.promise](const LandingOutcome& o) { p->set_value(o); };
  absl::Status s = r.landing.ExpectTransfer(std::move(spec));
  EXPECT_TRUE(s.ok()) << s;
  return e;
}

inline OutgoingTransferSpec SenderSpec(const Receiver& r, const Expectation& e, int64_t tokens,
                                       DType dtype, std::string peer = "") {
  OutgoingTransferSpec s;
  s.peer = std::move(peer);
  s.transfer_id = e.id;
  s.token = e.token;
  s.model_fingerprint = kFingerprint;
  s.geometry = r.store.layout().geometry;
  s.dtype = dtype;
  s.token_count = tokens;
  s.start_position = e.start;
  s.deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  return s;
}

// Checks that the store holds `p` (converted to the store dtype) at the expectation's range:
// bit-exact against the same conversion the receiver must have applied.
inline void ExpectLanded(const Receiver& r, const Expectation& e, const Payload& p) {
  const DType sd = r.store.layout().dtype;
  const size_t n = static_cast<size_t>(p.tokens * p.geometry.token_elems());
  std::vector<std::byte> want_k(n * DTypeSize(sd)), want_v(n * DTypeSize(sd));
  std::vector<std::byte> got_k(n * DTypeSize(sd)), got_v(n * DTypeSize(sd));
  for (int l = 0; l < p.geometry.num_layers; ++l) {
    ConvertElements(p.dtype, p.layers[l].k.data(), sd, want_k.data(), n);
    ConvertElements(p.dtype, p.layers[l].v.data(), sd, want_v.data(), n);
    absl::Status s =
        r.store.ReadTokens(l, e.table, e.start, p.tokens, sd, got_k.data(), got_v.data());
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_EQ(std::memcmp(want_k.data(), got_k.data(), want_k.size()), 0) << "K layer " << l;
    ASSERT_EQ(std::memcmp(want_v.data(), got_v.data(), want_v.size()), 0) << "V layer " << l;
  }
}

// Collects TransferAcks by transfer id; waits are bounded.
class AckCollector {
 public:
  TransferAckCallback Callback() {
    return [this](const TransferAck& a) {
      absl::MutexLock lock(&mu_);
      acks_.push_back(a);
    };
  }
  // Waits for the ack of `id`.
  std::optional<TransferAck> Wait(uint64_t id) {
    absl::MutexLock lock(&mu_);
    auto has = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      for (const auto& a : acks_) {
        if (a.transfer_id == id) return true;
      }
      return false;
    };
    mu_.AwaitWithTimeout(absl::Condition(&has), absl::Seconds(10));
    for (const auto& a : acks_) {
      if (a.transfer_id == id) return a;
    }
    ADD_FAILURE() << "no ack for transfer " << id;
    return std::nullopt;
  }
  size_t Count(uint64_t id) {
    absl::MutexLock lock(&mu_);
    size_t n = 0;
    for (const auto& a : acks_) n += a.transfer_id == id;
    return n;
  }

 private:
  absl::Mutex mu_;
  std::vector<TransferAck> acks_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tandem::testing
