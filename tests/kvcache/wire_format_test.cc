// Wire format: byte layout, round trips, hostile headers and bodies, the incremental decoder.
#include "kvcache/wire_format.h"

#include <gtest/gtest.h>

#include <cstring>
#include <limits>
#include <vector>

#include "xxhash.h"

namespace tandem {
namespace {

template <typename F>
std::vector<std::byte> EncodeToVector(const F& f) {
  std::vector<std::byte> out(EncodedSize(f));
  EXPECT_EQ(Encode(f, out), out.size());
  return out;
}

void Poke32(std::vector<std::byte>& b, size_t off, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[off + i] = static_cast<std::byte>(v >> (8 * i));
}
void Poke64(std::vector<std::byte>& b, size_t off, uint64_t v) {
  for (int i = 0; i < 8; ++i) b[off + i] = static_cast<std::byte>(v >> (8 * i));
}

BeginFrame SampleBegin() {
  BeginFrame b;
  b.transfer_id = 0x0102030405060708ull;
  for (size_t i = 0; i < b.token.size(); ++i) b.token[i] = static_cast<uint8_t>(i + 1);
  b.model_fingerprint = 0xfeedfacecafebeefull;
  b.geometry = KvGeometry{32, 8, 128};
  b.dtype = DType::kBF16;
  b.token_count = 2048;
  b.start_position = 16;
  return b;
}

TEST(WireFormatTest, HeaderIsLittleEndianWithMagicTDKV) {
  EndFrame e{42, 7, -0.5f};
  auto bytes = EncodeToVector(e);
  ASSERT_EQ(bytes.size(), kFrameHeaderBytes + kEndBodyBytes);
  EXPECT_EQ(std::memcmp(bytes.data(), "TDKV", 4), 0);
  EXPECT_EQ(static_cast<uint8_t>(bytes[4]), kWireVersion);
  EXPECT_EQ(static_cast<uint8_t>(bytes[5]), static_cast<uint8_t>(FrameType::kEnd));
  EXPECT_EQ(static_cast<uint8_t>(bytes[8]), kEndBodyBytes);  // body length, LE
  EXPECT_EQ(static_cast<uint8_t>(bytes[9]), 0);
  EXPECT_EQ(static_cast<uint8_t>(bytes[16]), 42);  // transfer id, LE
}

TEST(WireFormatTest, EveryFrameRoundTrips) {
  HelloFrame h;
  h.incarnation_id = 99;
  h.auth = "secret";
  auto hb = EncodeToVector(h);
  auto hd = Decode(hb);
  ASSERT_TRUE(hd.ok()) << hd.status();
  const auto& h2 = std::get<HelloFrame>(*hd);
  EXPECT_EQ(h2.incarnation_id, 99u);
  EXPECT_EQ(h2.auth, "secret");
  EXPECT_EQ(h2.role, PeerRole::kSender);

  const BeginFrame b = SampleBegin();
  auto bb = EncodeToVector(b);
  EXPECT_EQ(bb.size(), kFrameHeaderBytes + kBeginBodyBytes);
  auto bd = Decode(bb);
  ASSERT_TRUE(bd.ok()) << bd.status();
  const auto& b2 = std::get<BeginFrame>(*bd);
  EXPECT_EQ(b2.transfer_id, b.transfer_id);
  EXPECT_EQ(b2.token, b.token);
  EXPECT_EQ(b2.model_fingerprint, b.model_fingerprint);
  EXPECT_EQ(b2.geometry, b.geometry);
  EXPECT_EQ(b2.dtype, b.dtype);
  EXPECT_EQ(b2.token_count, b.token_count);
  EXPECT_EQ(b2.start_position, b.start_position);

  std::vector<std::byte> k(64), v(64);
  for (size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<std::byte>(i);
    v[i] = static_cast<std::byte>(255 - i);
  }
  LayerFrame l;
  l.transfer_id = 5;
  l.layer = 3;
  l.first_token = 16;
  l.token_count = 2;
  l.k = k;
  l.v = v;
  l.checksum = LayerChecksum(k, v);
  auto lb = EncodeToVector(l);
  EXPECT_EQ(lb.size(), kLayerPrefixBytes + 128);
  auto ld = Decode(lb);
  ASSERT_TRUE(ld.ok()) << ld.status();
  const auto& l2 = std::get<LayerFrame>(*ld);
  EXPECT_EQ(l2.layer, 3u);
  EXPECT_EQ(l2.first_token, 16u);
  EXPECT_EQ(l2.token_count, 2u);
  EXPECT_EQ(l2.checksum, l.checksum);
  ASSERT_EQ(l2.k.size(), 64u);
  EXPECT_EQ(std::memcmp(l2.k.data(), k.data(), 64), 0);
  EXPECT_EQ(std::memcmp(l2.v.data(), v.data(), 64), 0);
  // The scatter-gather prefix is the same bytes as the full encoding's start.
  std::array<std::byte, kLayerPrefixBytes> prefix;
  EncodeLayerPrefix(l, prefix);
  EXPECT_EQ(std::memcmp(prefix.data(), lb.data(), kLayerPrefixBytes), 0);

  auto ed = Decode(EncodeToVector(EndFrame{9, 1234, -1.25f}));
  ASSERT_TRUE(ed.ok());
  EXPECT_EQ(std::get<EndFrame>(*ed).first_token, 1234);
  EXPECT_EQ(std::get<EndFrame>(*ed).logprob, -1.25f);

  auto ab = EncodeToVector(AbortFrame{9, TransferError::kDeadlineExceeded, "too slow"});
  auto ad = Decode(ab);
  ASSERT_TRUE(ad.ok());
  EXPECT_EQ(std::get<AbortFrame>(*ad).reason, TransferError::kDeadlineExceeded);
  EXPECT_EQ(std::get<AbortFrame>(*ad).text, "too slow");

  ResultFrame r{9, absl::StatusCode::kDataLoss, TransferError::kChecksumMismatch, "layer 3"};
  const auto rb = EncodeToVector(r);  // decoded views point into it
  auto rd = Decode(rb);
  ASSERT_TRUE(rd.ok());
  EXPECT_EQ(std::get<ResultFrame>(*rd).code, absl::StatusCode::kDataLoss);
  EXPECT_EQ(std::get<ResultFrame>(*rd).reason, TransferError::kChecksumMismatch);
  EXPECT_EQ(std::get<ResultFrame>(*rd).text, "layer 3");
}

TEST(WireFormatTest, ChecksumIsXxh3OfKThenV) {
  std::vector<std::byte> k(100), v(37);
  for (size_t i = 0; i < k.size(); ++i) k[i] = static_cast<std::byte>(i * 3);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<std::byte>(i * 5 + 1);
  std::vector<std::byte> kv(k);
  kv.insert(kv.end(), v.begin(), v.end());
  EXPECT_EQ(LayerChecksum(k, v), XXH3_64bits(kv.data(), kv.size()));
}

TEST(WireFormatTest, ChecksumStreamMatchesAcrossAnySplit) {
  std::vector<std::byte> k(5000), v(5000);
  for (size_t i = 0; i < k.size(); ++i) k[i] = static_cast<std::byte>(i * 7 + 3);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<std::byte>(i * 11 + 1);
  std::vector<std::byte> kv(k);
  kv.insert(kv.end(), v.begin(), v.end());
  const uint64_t want = LayerChecksum(k, v);
  // Pieces that cross XXH3's 64-byte stripes, its 1 KiB blocks and the K/V boundary.
  for (size_t piece : {1u, 3u, 63u, 64u, 65u, 1000u, 1024u, 4999u, 10000u}) {
    LayerChecksumStream h;
    for (size_t off = 0; off < kv.size(); off += piece) {
      h.Update(std::span<const std::byte>(kv).subspan(off, std::min(piece, kv.size() - off)));
    }
    EXPECT_EQ(h.Digest(), want) << "pieces of " << piece;
    h.Reset();
    h.Update(kv);
    EXPECT_EQ(h.Digest(), want);
  }
  EXPECT_EQ(LayerChecksumStream().Digest(), LayerChecksum({}, {}));
}

TEST(WireFormatTest, LayerHeaderDecodesLikeTheWholeBody) {
  std::vector<std::byte> k(96, std::byte{1}), v(96, std::byte{2});
  LayerFrame l;
  l.transfer_id = 77;
  l.layer = 4;
  l.first_token = 1000;
  l.token_count = 3;
  l.k = k;
  l.v = v;
  l.checksum = LayerChecksum(k, v);
  std::vector<std::byte> b(EncodedSize(l));
  Encode(l, b);
  const auto body = std::span<const std::byte>(b).subspan(kFrameHeaderBytes);
  auto h = DecodeLayerHeader(body.first(kLayerFixedBytes), body.size());
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->transfer_id, 77u);
  EXPECT_EQ(h->layer, 4u);
  EXPECT_EQ(h->first_token, 1000u);
  EXPECT_EQ(h->token_count, 3u);
  EXPECT_EQ(h->tensor_bytes, 96u);
  EXPECT_EQ(h->checksum, l.checksum);
  // The same refusals as the whole-body decoder.
  EXPECT_FALSE(DecodeLayerHeader(body.first(kLayerFixedBytes), body.size() - 1).ok());
  EXPECT_FALSE(DecodeLayerHeader(body.first(kLayerFixedBytes - 1), body.size()).ok());
  EXPECT_FALSE(DecodeLayerHeader(body.first(kLayerFixedBytes), kLayerFixedBytes - 1).ok());
  std::vector<std::byte> empty(b.begin(), b.begin() + kLayerPrefixBytes);
  empty[kFrameHeaderBytes + 12] = std::byte{0};  // token_count 0
  empty[kFrameHeaderBytes + 24] = std::byte{0};  // tensor_bytes 0
  auto e = std::span<const std::byte>(empty).subspan(kFrameHeaderBytes);
  EXPECT_FALSE(DecodeLayerHeader(e, kLayerFixedBytes).ok());
  EXPECT_FALSE(DecodeFrameBody(FrameType::kLayer, e).ok());

  // A checksum filled in after the prefix was encoded.
  std::array<std::byte, kLayerPrefixBytes> prefix;
  LayerFrame unsummed = l;
  unsummed.checksum = 0;
  EncodeLayerPrefix(unsummed, prefix);
  SetLayerPrefixChecksum(prefix, l.checksum);
  EXPECT_EQ(std::memcmp(prefix.data(), b.data(), kLayerPrefixBytes), 0);
}

TEST(WireFormatTest, TextAndAuthAreTruncatedToWireLimits) {
  std::string big(5000, 'x');
  AbortFrame a{1, TransferError::kAbortedBySender, big};
  const auto ab = EncodeToVector(a);
  auto d = Decode(ab);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(std::get<AbortFrame>(*d).text.size(), kMaxTextBytes);
  HelloFrame h;
  h.auth = big;
  const auto hb = EncodeToVector(h);
  auto hd = Decode(hb);
  ASSERT_TRUE(hd.ok());
  EXPECT_EQ(std::get<HelloFrame>(*hd).auth.size(), kMaxAuthBytes);
}

TEST(WireFormatTest, HostileHeadersAreRejected) {
  const auto good = EncodeToVector(EndFrame{1, 2, 0.0f});
  auto expect_bad = [&](std::vector<std::byte> b, const char* what) {
    EXPECT_FALSE(DecodeFrameHeader(b, kDefaultMaxFrameBytes).ok()) << what;
    EXPECT_FALSE(Decode(b).ok()) << what;
  };
  auto b = good;
  b[0] = std::byte{'X'};
  expect_bad(b, "magic");
  b = good;
  b[4] = std::byte{2};
  expect_bad(b, "version");
  b = good;
  b[5] = std::byte{0};
  expect_bad(b, "type 0");
  b = good;
  b[5] = std::byte{7};
  expect_bad(b, "type 7");
  b = good;
  b[6] = std::byte{1};
  expect_bad(b, "flags");
  b = good;
  b[13] = std::byte{1};
  expect_bad(b, "reserved");
  b = good;
  Poke32(b, 8, 0xffffffffu);
  expect_bad(b, "body length overflow");
  b = good;
  Poke32(b, 8, kDefaultMaxFrameBytes - kFrameHeaderBytes + 1);
  expect_bad(b, "frame over the limit");
  EXPECT_FALSE(DecodeFrameHeader(std::span(good).first(15), kDefaultMaxFrameBytes).ok());
  // A smaller configured limit applies.
  EXPECT_FALSE(DecodeFrameHeader(good, 20).ok());
  // Whole-frame decode: length must match exactly.
  b = good;
  b.push_back(std::byte{0});
  EXPECT_FALSE(Decode(b).ok());
  b = good;
  b.pop_back();
  EXPECT_FALSE(Decode(b).ok());
}

TEST(WireFormatTest, HostileBodiesAreRejected) {
  auto body_of = [](const std::vector<std::byte>& f) {
    return std::span<const std::byte>(f).subspan(kFrameHeaderBytes);
  };
  // LAYER: tensor_bytes that overflow when doubled, odd payloads, empty range, short body.
  std::vector<std::byte> k(32), v(32);
  LayerFrame l;
  l.transfer_id = 1;
  l.token_count = 1;
  l.k = k;
  l.v = v;
  auto lf = EncodeToVector(l);
  EXPECT_TRUE(DecodeFrameBody(FrameType::kLayer, body_of(lf)).ok());
  for (uint64_t tb : {uint64_t{0}, uint64_t{31}, uint64_t{33}, uint64_t{1} << 63,
                      std::numeric_limits<uint64_t>::max()}) {
    auto bad = lf;
    Poke64(bad, kFrameHeaderBytes + 24, tb);
    EXPECT_FALSE(DecodeFrameBody(FrameType::kLayer, body_of(bad)).ok()) << tb;
  }
  {
    auto bad = lf;
    Poke32(bad, kFrameHeaderBytes + 12, 0);  // token_count 0
    EXPECT_FALSE(DecodeFrameBody(FrameType::kLayer, body_of(bad)).ok());
  }
  EXPECT_FALSE(DecodeFrameBody(FrameType::kLayer, body_of(lf).first(kLayerFixedBytes - 1)).ok());
  EXPECT_FALSE(DecodeFrameBody(FrameType::kLayer, body_of(lf).first(kLayerFixedBytes + 63)).ok());

  // BEGIN: zero/huge geometry, unknown dtype, token counts, wrong size.
  const auto bf = EncodeToVector(SampleBegin());
  auto begin_bad = [&](size_t off, uint32_t v32, const char* what) {
    auto bad = bf;
    Poke32(bad, kFrameHeaderBytes + off, v32);
    EXPECT_FALSE(DecodeFrameBody(FrameType::kBegin, body_of(bad)).ok()) << what;
  };
  begin_bad(32, 0, "zero layers");
  begin_bad(32, kMaxWireLayers + 1, "too many layers");
  begin_bad(36, 0, "zero heads");
  begin_bad(40, 0xffffffffu, "huge head dim");
  {
    auto bad = bf;
    bad[kFrameHeaderBytes + 44] = std::byte{3};
    EXPECT_FALSE(DecodeFrameBody(FrameType::kBegin, body_of(bad)).ok()) << "dtype";
    bad = bf;
    Poke64(bad, kFrameHeaderBytes + 48, 0);
    EXPECT_FALSE(DecodeFrameBody(FrameType::kBegin, body_of(bad)).ok()) << "0 tokens";
    bad = bf;
    Poke64(bad, kFrameHeaderBytes + 48, std::numeric_limits<uint64_t>::max());
    EXPECT_FALSE(DecodeFrameBody(FrameType::kBegin, body_of(bad)).ok()) << "huge tokens";
    bad = bf;
    Poke64(bad, kFrameHeaderBytes + 56, std::numeric_limits<uint64_t>::max());
    EXPECT_FALSE(DecodeFrameBody(FrameType::kBegin, body_of(bad)).ok()) << "huge start";
  }
  EXPECT_FALSE(DecodeFrameBody(FrameType::kBegin, body_of(bf).first(63)).ok());

  // Text lengths that disagree with the body.
  auto af = EncodeToVector(AbortFrame{1, TransferError::kAbortedBySender, "abc"});
  af[kFrameHeaderBytes + 10] = std::byte{4};
  EXPECT_FALSE(DecodeFrameBody(FrameType::kAbort, body_of(af)).ok());
  auto hf = EncodeToVector(HelloFrame{kWireVersion, PeerRole::kSender, 1, "ab"});
  hf[kFrameHeaderBytes + 4] = std::byte{0xff};
  EXPECT_FALSE(DecodeFrameBody(FrameType::kHello, body_of(hf)).ok());
  // RESULT: success code with a failure reason.
  auto rf = EncodeToVector(ResultFrame{1, absl::StatusCode::kOk, TransferError::kOk, ""});
  rf[kFrameHeaderBytes + 10] = std::byte{3};
  EXPECT_FALSE(DecodeFrameBody(FrameType::kResult, body_of(rf)).ok());
  EXPECT_FALSE(DecodeFrameBody(FrameType::kEnd, {}).ok());
}

TEST(WireFormatTest, PeekTransferIdNamesTheTransferOfABrokenBody) {
  auto f = EncodeToVector(EndFrame{0xabcdef, 1, 0.0f});
  auto body = std::span<const std::byte>(f).subspan(kFrameHeaderBytes);
  EXPECT_EQ(PeekTransferId(FrameType::kEnd, body), 0xabcdefu);
  EXPECT_EQ(PeekTransferId(FrameType::kEnd, body.first(7)), std::nullopt);
  EXPECT_EQ(PeekTransferId(FrameType::kHello, body), std::nullopt);
}

TEST(WireFormatTest, DecoderFindsFramesAcrossArbitrarySplits) {
  std::vector<std::byte> stream;
  auto append = [&](const std::vector<std::byte>& f) {
    stream.insert(stream.end(), f.begin(), f.end());
  };
  append(EncodeToVector(SampleBegin()));
  std::vector<std::byte> k(48, std::byte{1}), v(48, std::byte{2});
  LayerFrame l;
  l.transfer_id = 7;
  l.token_count = 3;
  l.k = k;
  l.v = v;
  append(EncodeToVector(l));
  append(EncodeToVector(EndFrame{7, 5, 0.0f}));

  for (size_t chunk : {size_t{1}, size_t{3}, size_t{16}, size_t{17}, stream.size()}) {
    FrameDecoder dec;
    std::vector<std::byte> buffer;  // the caller's unconsumed bytes
    std::vector<FrameType> types;
    size_t fed = 0;
    while (fed < stream.size()) {
      const size_t n = std::min(chunk, stream.size() - fed);
      buffer.insert(buffer.end(), stream.begin() + fed, stream.begin() + fed + n);
      fed += n;
      std::span<const std::byte> in(buffer);
      for (;;) {
        const auto before = in;
        RawFrame raw;
        auto r = dec.Next(in, &raw);
        ASSERT_TRUE(r.ok()) << r.status();
        if (*r == FrameDecoder::Result::kNeedMore) {
          EXPECT_EQ(in.data(), before.data());  // untouched
          EXPECT_EQ(in.size(), before.size());
          EXPECT_GT(dec.bytes_needed(), in.size());
          break;
        }
        types.push_back(raw.type);
        EXPECT_TRUE(DecodeFrameBody(raw.type, raw.body).ok());
      }
      buffer.erase(buffer.begin(), buffer.begin() + (buffer.size() - in.size()));
    }
    EXPECT_TRUE(buffer.empty());
    EXPECT_EQ(types,
              (std::vector<FrameType>{FrameType::kBegin, FrameType::kLayer, FrameType::kEnd}))
        << "chunk " << chunk;
  }
}

TEST(WireFormatTest, DecoderErrorLeavesInputUntouchedAndIsSticky) {
  auto f = EncodeToVector(EndFrame{1, 2, 0.0f});
  Poke32(f, 8, 0x7fffffffu);  // body far over the limit
  FrameDecoder dec(1 << 20);
  std::span<const std::byte> in(f);
  RawFrame raw;
  auto r = dec.Next(in, &raw);
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(in.size(), f.size());
  EXPECT_EQ(dec.state(), FrameDecoder::State::kError);
  auto good = EncodeToVector(EndFrame{1, 2, 0.0f});
  std::span<const std::byte> in2(good);
  EXPECT_FALSE(dec.Next(in2, &raw).ok());
  EXPECT_EQ(in2.size(), good.size());
}

TEST(WireFormatTest, DecoderReportsBytesNeededAfterHeader) {
  std::vector<std::byte> k(100), v(100);
  LayerFrame l;
  l.transfer_id = 1;
  l.token_count = 1;
  l.k = k;
  l.v = v;
  auto f = EncodeToVector(l);
  FrameDecoder dec;
  std::span<const std::byte> in = std::span<const std::byte>(f).first(kFrameHeaderBytes);
  RawFrame raw;
  auto r = dec.Next(in, &raw);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, FrameDecoder::Result::kNeedMore);
  EXPECT_EQ(dec.state(), FrameDecoder::State::kBody);
  EXPECT_EQ(dec.bytes_needed(), f.size());
  std::span<const std::byte> all(f);
  r = dec.Next(all, &raw);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, FrameDecoder::Result::kFrame);
  EXPECT_TRUE(all.empty());
  EXPECT_EQ(raw.body.size(), f.size() - kFrameHeaderBytes);
}

TEST(WireFormatTest, StatusCodesFollowReasons) {
  EXPECT_TRUE(TransferStatus(TransferError::kOk, "").ok());
  EXPECT_EQ(TransferStatus(TransferError::kChecksumMismatch, "x").code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(TransferStatus(TransferError::kBadToken, "x").code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(TransferStatus(TransferError::kDeadlineExceeded, "x").code(),
            absl::StatusCode::kDeadlineExceeded);
  for (int i = 0; i < kNumTransferErrors; ++i) {
    EXPECT_NE(TransferErrorName(static_cast<TransferError>(i)), "");
  }
  EXPECT_NE(
      TransferStatus(TransferError::kDuplicateLayer, "layer 3").message().find("duplicate_layer"),
      std::string::npos);
}

}  // namespace
}  // namespace tandem
