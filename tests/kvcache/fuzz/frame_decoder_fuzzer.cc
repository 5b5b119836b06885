// libFuzzer entry point: arbitrary bytes as a sender's stream into the frame decoder and a
// landing with two expected transfers. Invariants: no crash or sanitizer report, each transfer
// ends exactly once, and the pool is whole again afterwards.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>

#include "kvcache/block_pool.h"
#include "kvcache/kv_landing.h"
#include "kvcache/kv_store.h"
#include "kvcache/wire_format.h"

namespace {

using namespace tandem;

class NullSink : public ResultSink {
 public:
  void SendResult(const ResultFrame&) override {}
};

void Check(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const KvGeometry geo{2, 2, 4};
  BlockPool pool(8, 4);
  HostKvStore store(KvStoreLayout{geo, 4, DType::kF32, 8});
  int ended[3] = {0, 0, 0};
  std::vector<BlockId> tables[3];
  {
    KvLanding landing(pool, store);
    for (uint64_t id : {1, 2}) {
      auto t = pool.Allocate(3);
      Check(t.ok());
      tables[id] = *t;
      ExpectedTransfer spec;
      spec.transfer_id = id;
      spec.token[0] = static_cast<uint8_t>(id);  // tokens a fuzzer can find
      spec.model_fingerprint = 0;
      spec.geometry = geo;
      spec.token_count = 9;
      spec.block_table = *t;
      spec.deadline = KvClock::now() + std::chrono::hours(1);
      spec.on_done = [&ended, id](const LandingOutcome&) { ++ended[id]; };
      Check(landing.ExpectTransfer(std::move(spec)).ok());
    }
    const PeerId peer = landing.AttachPeer(std::make_shared<NullSink>());
    FrameDecoder decoder(1 << 16);
    std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
    for (;;) {
      RawFrame raw;
      auto r = decoder.Next(in, &raw);
      if (!r.ok() || *r == FrameDecoder::Result::kNeedMore) break;
      if (!landing.OnFrame(peer, raw.type, raw.body).ok()) break;
    }
    landing.DetachPeer(peer, "fuzz input over");
  }  // the landing's destructor ends whatever is still expected
  Check(ended[1] == 1 && ended[2] == 1);
  pool.Release(tables[1]);
  pool.Release(tables[2]);
  Check(pool.CheckInvariants().empty());
  Check(pool.num_free_blocks() == pool.num_blocks());
  return 0;
}
