// Bounded mutation fuzzing of the frame decoder and the landing (fixed seed, runs in seconds
// under ASan): whatever the bytes, no crash, every transfer ends exactly once, every block
// returns to the pool.
#include <gtest/gtest.h>

#include <random>

#include "kvcache/kv_landing.h"
#include "kvcache/wire_format.h"
#include "tests/kvcache/kv_test_util.h"

namespace tandem {
namespace {

using testing::kFingerprint;
using testing::MakePayload;
using testing::Payload;
using testing::TokenFor;

const KvGeometry kGeo{2, 2, 4};
constexpr int64_t kTokens = 9;

class NullSink : public ResultSink {
 public:
  void SendResult(const ResultFrame& f) override {
    ++results;
    EXPECT_LE(f.text.size(), kMaxTextBytes);
  }
  int results = 0;
};

template <typename F>
void Append(std::vector<std::byte>& out, const F& f) {
  const size_t at = out.size();
  out.resize(at + EncodedSize(f));
  Encode(f, std::span<std::byte>(out).subspan(at));
}

// A plausible conversation: two transfers (one ends, one aborts) plus a stray frame.
std::vector<std::byte> BaseStream(const Payload& p) {
  std::vector<std::byte> s;
  for (uint64_t id : {1, 2}) {
    BeginFrame b;
    b.transfer_id = id;
    b.token = TokenFor(id);
    b.model_fingerprint = kFingerprint;
    b.geometry = kGeo;
    b.dtype = p.dtype;
    b.token_count = kTokens;
    Append(s, b);
  }
  const uint64_t tb = p.token_bytes();
  for (uint64_t id : {1, 2}) {
    for (uint32_t l = 0; l < 2; ++l) {
      for (uint64_t first : {uint64_t{0}, uint64_t{4}}) {
        const uint32_t n = first == 0 ? 4 : kTokens - 4;
        LayerFrame f;
        f.transfer_id = id;
        f.layer = l;
        f.first_token = first;
        f.token_count = n;
        f.k = std::span<const std::byte>(p.layers[l].k).subspan(first * tb, n * tb);
        f.v = std::span<const std::byte>(p.layers[l].v).subspan(first * tb, n * tb);
        f.checksum = LayerChecksum(f.k, f.v);
        Append(s, f);
      }
    }
  }
  Append(s, EndFrame{1, 5, -0.5f});
  Append(s, AbortFrame{2, TransferError::kAbortedBySender, "bye"});
  Append(s, EndFrame{3, 1, 0.0f});
  return s;
}

void Mutate(std::vector<std::byte>& s, std::mt19937_64& rng) {
  const int n = 1 + static_cast<int>(rng() % 4);
  for (int i = 0; i < n && !s.empty(); ++i) {
    const size_t at = rng() % s.size();
    switch (rng() % 7) {
      case 0:  // bit flip
        s[at] ^= static_cast<std::byte>(1u << (rng() % 8));
        break;
      case 1:  // random byte
        s[at] = static_cast<std::byte>(rng());
        break;
      case 2: {  // interesting 32/64-bit value
        static const uint64_t kVals[] = {0,      1,          2,           0x7f,       0xff,
                                         0xffff, 0x7fffffff, 0xffffffff,  0x80000000, 1ull << 32,
                                         ~0ull,  kTokens,    kTokens + 1, 16,         40};
        const uint64_t v = kVals[rng() % std::size(kVals)];
        const size_t width = rng() % 2 ? 4 : 8;
        for (size_t b = 0; b < width && at + b < s.size(); ++b) {
          s[at + b] = static_cast<std::byte>(v >> (8 * b));
        }
        break;
      }
      case 3:  // truncate
        s.resize(at);
        break;
      case 4: {  // duplicate a slice
        const size_t len = std::min<size_t>(rng() % 128, s.size() - at);
        std::vector<std::byte> slice(s.begin() + at, s.begin() + at + len);
        const size_t to = rng() % (s.size() + 1);
        s.insert(s.begin() + to, slice.begin(), slice.end());
        break;
      }
      case 5: {  // delete a slice
        const size_t len = std::min<size_t>(rng() % 64, s.size() - at);
        s.erase(s.begin() + at, s.begin() + at + len);
        break;
      }
      case 6:  // insert random bytes
        for (int k = 0; k < 1 + static_cast<int>(rng() % 8); ++k) {
          s.insert(s.begin() + at, static_cast<std::byte>(rng()));
        }
        break;
    }
  }
}

TEST(FrameFuzzTest, MutatedStreamsNeverBreakTheLanding) {
  std::mt19937_64 rng(20240601);
  const DType dtypes[] = {DType::kF32, DType::kF16, DType::kBF16};
  int frames_seen = 0;
  for (int iter = 0; iter < 1500; ++iter) {
    const DType src = dtypes[iter % 3];
    const Payload p = MakePayload(kGeo, kTokens, src, static_cast<uint32_t>(iter));
    std::vector<std::byte> stream = BaseStream(p);
    if (iter % 10 != 0) {  // every tenth stream runs clean
      Mutate(stream, rng);
    }

    testing::Receiver r(kGeo, 4, dtypes[(iter / 3) % 3], 8);
    int callbacks[3] = {0, 0, 0};
    std::vector<BlockId> tables[3];
    for (uint64_t id : {1, 2}) {
      auto t = r.pool.Allocate(3);
      ASSERT_TRUE(t.ok());
      tables[id] = *t;
      ExpectedTransfer spec;
      spec.transfer_id = id;
      spec.token = TokenFor(id);
      spec.model_fingerprint = kFingerprint;
      spec.geometry = kGeo;
      spec.token_count = kTokens;
      spec.block_table = *t;
      spec.deadline = KvClock::now() + std::chrono::seconds(60);
      spec.on_done = [&callbacks, id](const LandingOutcome&) { ++callbacks[id]; };
      ASSERT_TRUE(r.landing.ExpectTransfer(std::move(spec)).ok());
    }
    auto sink = std::make_shared<NullSink>();
    const PeerId peer = r.landing.AttachPeer(sink);

    // Feed the stream in random chunks, as a socket would deliver it.
    FrameDecoder decoder(1 << 16);
    std::vector<std::byte> pending;
    size_t fed = 0;
    bool closed = false;
    while (fed < stream.size() && !closed) {
      const size_t n = std::min<size_t>(1 + rng() % 97, stream.size() - fed);
      pending.insert(pending.end(), stream.begin() + fed, stream.begin() + fed + n);
      fed += n;
      std::span<const std::byte> in(pending);
      for (;;) {
        RawFrame raw;
        auto res = decoder.Next(in, &raw);
        if (!res.ok()) {
          closed = true;  // desynchronised: the transport would close the connection
          break;
        }
        if (*res == FrameDecoder::Result::kNeedMore) break;
        ++frames_seen;
        if (!r.landing.OnFrame(peer, raw.type, raw.body).ok()) {
          closed = true;
          break;
        }
      }
      pending.erase(pending.begin(), pending.begin() + (pending.size() - in.size()));
    }
    r.landing.DetachPeer(peer, "fuzz stream over");
    r.landing.Cancel(1);
    r.landing.Cancel(2);
    EXPECT_EQ(callbacks[1], 1) << "iteration " << iter;
    EXPECT_EQ(callbacks[2], 1) << "iteration " << iter;
    r.pool.Release(tables[1]);
    r.pool.Release(tables[2]);
    ASSERT_EQ(r.pool.CheckInvariants(), "") << "iteration " << iter;
    ASSERT_TRUE(r.AllFree()) << "iteration " << iter;
    ASSERT_EQ(r.landing.Stats().active_transfers, 0u);
  }
  EXPECT_GT(frames_seen, 1500);
}

TEST(FrameFuzzTest, RandomBytesNeverDecodeOutOfBounds) {
  std::mt19937_64 rng(7);
  std::vector<std::byte> buf;
  for (int iter = 0; iter < 20000; ++iter) {
    buf.resize(rng() % 200);
    for (auto& b : buf) b = static_cast<std::byte>(rng());
    if (buf.size() >= kFrameHeaderBytes && iter % 2 == 0) {
      // A valid header in front makes the body decoders do the work.
      const uint32_t body = static_cast<uint32_t>(buf.size() - kFrameHeaderBytes);
      const std::byte hdr[8] = {std::byte{'T'},
                                std::byte{'D'},
                                std::byte{'K'},
                                std::byte{'V'},
                                std::byte{kWireVersion},
                                static_cast<std::byte>(1 + rng() % 6),
                                std::byte{0},
                                std::byte{0}};
      std::copy(std::begin(hdr), std::end(hdr), buf.begin());
      for (int i = 0; i < 4; ++i) buf[8 + i] = static_cast<std::byte>(body >> (8 * i));
      for (int i = 12; i < 16; ++i) buf[i] = std::byte{0};
    }
    auto f = Decode(buf);
    if (f.ok()) {
      if (auto* l = std::get_if<LayerFrame>(&*f)) {
        ASSERT_EQ(l->k.size(), l->v.size());
        ASSERT_LE(l->v.data() + l->v.size(), buf.data() + buf.size());
      }
    }
  }
}

}  // namespace
}  // namespace tandem
