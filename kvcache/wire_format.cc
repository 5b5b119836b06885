// KV wire format: little-endian field access, frame encoding and bounds-checked decoding.
#include "kvcache/wire_format.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kvcache/internal/strings.h"

#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t on the stack: no allocation per frame
#include "xxhash.h"
#if defined(TANDEM_HAVE_XXH3_DISPATCH)
// libxxhash's run-time dispatch: the plain entry points of a distribution's build are compiled
// for the baseline ISA (SSE2 on x86-64), 3-4x slower than AVX-512 on data hot in cache.
#include "xxh_x86dispatch.h"
#endif

namespace tandem {
namespace {

// Little-endian stores/loads; the compiler turns these into plain moves on little-endian hosts.
void Put16(std::byte* p, uint16_t v) {
  for (int i = 0; i < 2; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
void Put32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
void Put64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
uint16_t Get16(const std::byte* p) {
  return static_cast<uint16_t>(static_cast<uint16_t>(p[0]) | (static_cast<uint16_t>(p[1]) << 8));
}
uint32_t Get32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint32_t>(p[i]);
  return v;
}
uint64_t Get64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint64_t>(p[i]);
  return v;
}

void PutHeader(std::byte* p, FrameType type, size_t body_bytes) {
  Put32(p, kWireMagic);
  p[4] = static_cast<std::byte>(kWireVersion);
  p[5] = static_cast<std::byte>(type);
  Put16(p + 6, 0);
  Put32(p + 8, static_cast<uint32_t>(body_bytes));
  Put32(p + 12, 0);
}

size_t ClampText(std::string_view s, size_t limit) { return std::min(s.size(), limit); }

absl::Status Malformed(FrameType type, std::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("malformed ", internal::Av(FrameTypeName(type)),
                                                 " frame: ", internal::Av(what)));
}

bool ValidDType(uint8_t d) { return d <= static_cast<uint8_t>(DType::kBF16); }

}  // namespace

std::string_view FrameTypeName(FrameType t) {
  switch (t) {
    case FrameType::kHello:
      return "HELLO";
    case FrameType::kBegin:
      return "BEGIN";
    case FrameType::kLayer:
      return "LAYER";
    case FrameType::kEnd:
      return "END";
    case FrameType::kAbort:
      return "ABORT";
    case FrameType::kResult:
      return "RESULT";
  }
  return "UNKNOWN";
}

std::string_view TransferErrorName(TransferError e) {
  switch (e) {
    case TransferError::kOk:
      return "ok";
    case TransferError::kMalformedFrame:
      return "malformed_frame";
    case TransferError::kProtocolViolation:
      return "protocol_violation";
    case TransferError::kUnknownTransfer:
      return "unknown_transfer";
    case TransferError::kBadToken:
      return "bad_token";
    case TransferError::kFingerprintMismatch:
      return "fingerprint_mismatch";
    case TransferError::kLayoutMismatch:
      return "layout_mismatch";
    case TransferError::kLayerOutOfRange:
      return "layer_out_of_range";
    case TransferError::kTokenRangeOutOfRange:
      return "token_range_out_of_range";
    case TransferError::kDuplicateLayer:
      return "duplicate_layer";
    case TransferError::kSizeMismatch:
      return "size_mismatch";
    case TransferError::kChecksumMismatch:
      return "checksum_mismatch";
    case TransferError::kIncomplete:
      return "incomplete";
    case TransferError::kDeadlineExceeded:
      return "deadline_exceeded";
    case TransferError::kPeerDisconnected:
      return "peer_disconnected";
    case TransferError::kAbortedBySender:
      return "aborted_by_sender";
    case TransferError::kCancelledByReceiver:
      return "cancelled_by_receiver";
    case TransferError::kStoreWriteFailed:
      return "store_write_failed";
    case TransferError::kShutdown:
      return "shutdown";
    case TransferError::kWriteTimeout:
      return "write_timeout";
    case TransferError::kConnectFailed:
      return "connect_failed";
    case TransferError::kAuthFailed:
      return "auth_failed";
    case TransferError::kIncarnationMismatch:
      return "incarnation_mismatch";
    case TransferError::kInvalidArgument:
      return "invalid_argument";
    case TransferError::kOther:
      return "other";
  }
  return "other";
}

absl::StatusCode TransferErrorCode(TransferError reason) {
  using C = absl::StatusCode;
  switch (reason) {
    case TransferError::kOk:
      return C::kOk;
    case TransferError::kMalformedFrame:
    case TransferError::kLayoutMismatch:
    case TransferError::kLayerOutOfRange:
    case TransferError::kTokenRangeOutOfRange:
    case TransferError::kDuplicateLayer:
    case TransferError::kSizeMismatch:
    case TransferError::kInvalidArgument:
      return C::kInvalidArgument;
    case TransferError::kProtocolViolation:
    case TransferError::kIncomplete:
    case TransferError::kFingerprintMismatch:
    case TransferError::kIncarnationMismatch:
      return C::kFailedPrecondition;
    case TransferError::kUnknownTransfer:
      return C::kNotFound;
    case TransferError::kBadToken:
      return C::kPermissionDenied;
    case TransferError::kAuthFailed:
      return C::kUnauthenticated;
    case TransferError::kChecksumMismatch:
      return C::kDataLoss;
    case TransferError::kDeadlineExceeded:
    case TransferError::kWriteTimeout:
      return C::kDeadlineExceeded;
    case TransferError::kPeerDisconnected:
    case TransferError::kShutdown:
    case TransferError::kConnectFailed:
      return C::kUnavailable;
    case TransferError::kAbortedBySender:
      return C::kAborted;
    case TransferError::kCancelledByReceiver:
      return C::kCancelled;
    case TransferError::kStoreWriteFailed:
    case TransferError::kOther:
      return C::kInternal;
  }
  return C::kInternal;
}

absl::Status TransferStatus(TransferError reason, std::string_view detail) {
  if (reason == TransferError::kOk) {
    return absl::OkStatus();
  }
  return absl::Status(
      TransferErrorCode(reason),
      absl::StrCat(internal::Av(TransferErrorName(reason)), ": ", internal::Av(detail)));
}

uint64_t LayerChecksum(std::span<const std::byte> k, std::span<const std::byte> v) {
  LayerChecksumStream h;
  h.Update(k);
  h.Update(v);
  return h.Digest();
}

void LayerChecksumStream::Reset() {
  static_assert(sizeof(XXH3_state_t) <= sizeof(state_), "LayerChecksumStream::state_ too small");
  static_assert(alignof(XXH3_state_t) <= alignof(LayerChecksumStream),
                "LayerChecksumStream::state_ under-aligned");
  XXH3_64bits_reset(reinterpret_cast<XXH3_state_t*>(state_));
}

void LayerChecksumStream::Update(std::span<const std::byte> bytes) {
  if (!bytes.empty()) {
    XXH3_64bits_update(reinterpret_cast<XXH3_state_t*>(state_), bytes.data(), bytes.size());
  }
}

uint64_t LayerChecksumStream::Digest() const {
  return XXH3_64bits_digest(reinterpret_cast<const XXH3_state_t*>(state_));
}

bool TokensEqual(const TransferToken& a, const TransferToken& b) {
  uint8_t diff = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff |= static_cast<uint8_t>(a[i] ^ b[i]);
  }
  return diff == 0;
}

// ---- Encoding ----

size_t EncodedSize(const HelloFrame& f) {
  return kFrameHeaderBytes + kHelloFixedBytes + ClampText(f.auth, kMaxAuthBytes);
}
size_t EncodedSize(const BeginFrame&) { return kFrameHeaderBytes + kBeginBodyBytes; }
size_t EncodedSize(const LayerFrame& f) { return kLayerPrefixBytes + f.k.size() + f.v.size(); }
size_t EncodedSize(const EndFrame&) { return kFrameHeaderBytes + kEndBodyBytes; }
size_t EncodedSize(const AbortFrame& f) {
  return kFrameHeaderBytes + kAbortFixedBytes + ClampText(f.text, kMaxTextBytes);
}
size_t EncodedSize(const ResultFrame& f) {
  return kFrameHeaderBytes + kResultFixedBytes + ClampText(f.text, kMaxTextBytes);
}

size_t Encode(const HelloFrame& f, std::span<std::byte> out) {
  const size_t auth = ClampText(f.auth, kMaxAuthBytes);
  const size_t n = EncodedSize(f);
  std::byte* p = out.data();
  PutHeader(p, FrameType::kHello, n - kFrameHeaderBytes);
  p += kFrameHeaderBytes;
  Put16(p, f.protocol_version);
  p[2] = static_cast<std::byte>(f.role);
  p[3] = std::byte{0};
  Put16(p + 4, static_cast<uint16_t>(auth));
  Put16(p + 6, 0);
  Put64(p + 8, f.incarnation_id);
  if (auth > 0) {
    std::memcpy(p + kHelloFixedBytes, f.auth.data(), auth);
  }
  return n;
}

size_t Encode(const BeginFrame& f, std::span<std::byte> out) {
  std::byte* p = out.data();
  PutHeader(p, FrameType::kBegin, kBeginBodyBytes);
  p += kFrameHeaderBytes;
  Put64(p, f.transfer_id);
  std::memcpy(p + 8, f.token.data(), kTransferTokenBytes);
  Put64(p + 24, f.model_fingerprint);
  Put32(p + 32, static_cast<uint32_t>(f.geometry.num_layers));
  Put32(p + 36, static_cast<uint32_t>(f.geometry.num_kv_heads));
  Put32(p + 40, static_cast<uint32_t>(f.geometry.head_dim));
  p[44] = static_cast<std::byte>(f.dtype);
  p[45] = p[46] = p[47] = std::byte{0};
  Put64(p + 48, f.token_count);
  Put64(p + 56, f.start_position);
  return kFrameHeaderBytes + kBeginBodyBytes;
}

void EncodeLayerPrefix(const LayerFrame& f, std::span<std::byte, kLayerPrefixBytes> out) {
  std::byte* p = out.data();
  PutHeader(p, FrameType::kLayer, kLayerFixedBytes + f.k.size() + f.v.size());
  p += kFrameHeaderBytes;
  Put64(p, f.transfer_id);
  Put32(p + 8, f.layer);
  Put32(p + 12, f.token_count);
  Put64(p + 16, f.first_token);
  Put64(p + 24, f.k.size());
  Put64(p + 32, f.checksum);
}

void SetLayerPrefixChecksum(std::span<std::byte, kLayerPrefixBytes> prefix, uint64_t checksum) {
  Put64(prefix.data() + kFrameHeaderBytes + 32, checksum);
}

size_t Encode(const LayerFrame& f, std::span<std::byte> out) {
  EncodeLayerPrefix(f, out.first<kLayerPrefixBytes>());
  std::byte* p = out.data() + kLayerPrefixBytes;
  if (!f.k.empty()) {
    std::memcpy(p, f.k.data(), f.k.size());
  }
  if (!f.v.empty()) {
    std::memcpy(p + f.k.size(), f.v.data(), f.v.size());
  }
  return EncodedSize(f);
}

size_t Encode(const EndFrame& f, std::span<std::byte> out) {
  std::byte* p = out.data();
  PutHeader(p, FrameType::kEnd, kEndBodyBytes);
  p += kFrameHeaderBytes;
  Put64(p, f.transfer_id);
  Put32(p + 8, static_cast<uint32_t>(f.first_token));
  uint32_t bits;
  std::memcpy(&bits, &f.logprob, 4);
  Put32(p + 12, bits);
  return kFrameHeaderBytes + kEndBodyBytes;
}

size_t Encode(const AbortFrame& f, std::span<std::byte> out) {
  const size_t text = ClampText(f.text, kMaxTextBytes);
  const size_t n = EncodedSize(f);
  std::byte* p = out.data();
  PutHeader(p, FrameType::kAbort, n - kFrameHeaderBytes);
  p += kFrameHeaderBytes;
  Put64(p, f.transfer_id);
  Put16(p + 8, static_cast<uint16_t>(f.reason));
  Put16(p + 10, static_cast<uint16_t>(text));
  Put32(p + 12, 0);
  if (text > 0) {
    std::memcpy(p + kAbortFixedBytes, f.text.data(), text);
  }
  return n;
}

size_t Encode(const ResultFrame& f, std::span<std::byte> out) {
  const size_t text = ClampText(f.text, kMaxTextBytes);
  const size_t n = EncodedSize(f);
  std::byte* p = out.data();
  PutHeader(p, FrameType::kResult, n - kFrameHeaderBytes);
  p += kFrameHeaderBytes;
  Put64(p, f.transfer_id);
  Put16(p + 8, static_cast<uint16_t>(f.code));
  Put16(p + 10, static_cast<uint16_t>(f.reason));
  Put16(p + 12, static_cast<uint16_t>(text));
  Put16(p + 14, 0);
  if (text > 0) {
    std::memcpy(p + kResultFixedBytes, f.text.data(), text);
  }
  return n;
}

// ---- Decoding ----

absl::StatusOr<FrameHeader> DecodeFrameHeader(std::span<const std::byte> in,
                                              uint32_t max_frame_bytes) {
  if (in.size() < kFrameHeaderBytes) {
    return absl::InvalidArgumentError("frame header truncated");
  }
  const std::byte* p = in.data();
  if (Get32(p) != kWireMagic) {
    return absl::InvalidArgumentError("bad frame magic");
  }
  const uint8_t version = static_cast<uint8_t>(p[4]);
  if (version != kWireVersion) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported wire version ", version,
                                                   " (this build speaks ", kWireVersion, ")"));
  }
  const uint8_t type = static_cast<uint8_t>(p[5]);
  if (type < static_cast<uint8_t>(FrameType::kHello) ||
      type > static_cast<uint8_t>(FrameType::kResult)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown frame type ", type));
  }
  if (Get16(p + 6) != 0 || Get32(p + 12) != 0) {
    return absl::InvalidArgumentError("non-zero reserved bits in frame header");
  }
  const uint32_t body = Get32(p + 8);
  const uint32_t limit = std::min(max_frame_bytes, kMaxFrameBytesLimit);
  // Compare without adding: body may be near UINT32_MAX.
  if (limit < kFrameHeaderBytes || body > limit - kFrameHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("frame body of ", body, " bytes exceeds the ", limit, "-byte frame limit"));
  }
  return FrameHeader{static_cast<FrameType>(type), body};
}

absl::StatusOr<LayerHeader> DecodeLayerHeader(std::span<const std::byte> fixed,
                                              uint64_t body_bytes) {
  if (fixed.size() < kLayerFixedBytes || body_bytes < kLayerFixedBytes) {
    return Malformed(FrameType::kLayer, "body shorter than its fixed part");
  }
  const std::byte* p = fixed.data();
  LayerHeader h;
  h.transfer_id = Get64(p);
  h.layer = Get32(p + 8);
  h.token_count = Get32(p + 12);
  h.first_token = Get64(p + 16);
  h.tensor_bytes = Get64(p + 24);
  h.checksum = Get64(p + 32);
  const uint64_t payload = body_bytes - kLayerFixedBytes;
  // tensor_bytes comes from the peer: divide instead of multiplying so it cannot overflow.
  if (payload % 2 != 0 || h.tensor_bytes != payload / 2) {
    return Malformed(FrameType::kLayer,
                     absl::StrCat("tensor_bytes ", h.tensor_bytes, " does not match the ", payload,
                                  "-byte payload"));
  }
  if (h.token_count == 0) {
    return Malformed(FrameType::kLayer, "empty token range");
  }
  return h;
}

std::optional<uint64_t> PeekTransferId(FrameType type, std::span<const std::byte> body) {
  if (type == FrameType::kHello || body.size() < 8) {
    return std::nullopt;
  }
  return Get64(body.data());
}

namespace {

absl::StatusOr<Frame> DecodeHello(std::span<const std::byte> b) {
  if (b.size() < kHelloFixedBytes) {
    return Malformed(FrameType::kHello, "body shorter than its fixed part");
  }
  HelloFrame f;
  f.protocol_version = Get16(b.data());
  const uint8_t role = static_cast<uint8_t>(b[2]);
  if (role != static_cast<uint8_t>(PeerRole::kSender) &&
      role != static_cast<uint8_t>(PeerRole::kReceiver)) {
    return Malformed(FrameType::kHello, absl::StrCat("unknown role ", role));
  }
  f.role = static_cast<PeerRole>(role);
  const uint16_t auth = Get16(b.data() + 4);
  if (static_cast<uint8_t>(b[3]) != 0 || Get16(b.data() + 6) != 0) {
    return Malformed(FrameType::kHello, "non-zero reserved field");
  }
  if (auth > kMaxAuthBytes || b.size() - kHelloFixedBytes != auth) {
    return Malformed(FrameType::kHello, "auth length does not match the body");
  }
  f.incarnation_id = Get64(b.data() + 8);
  f.auth = std::string_view(reinterpret_cast<const char*>(b.data() + kHelloFixedBytes), auth);
  return f;
}

absl::StatusOr<Frame> DecodeBegin(std::span<const std::byte> b) {
  if (b.size() != kBeginBodyBytes) {
    return Malformed(FrameType::kBegin,
                     absl::StrCat("body is ", b.size(), " bytes, expected ", kBeginBodyBytes));
  }
  const std::byte* p = b.data();
  BeginFrame f;
  f.transfer_id = Get64(p);
  std::memcpy(f.token.data(), p + 8, kTransferTokenBytes);
  f.model_fingerprint = Get64(p + 24);
  const uint32_t layers = Get32(p + 32);
  const uint32_t heads = Get32(p + 36);
  const uint32_t head_dim = Get32(p + 40);
  const uint8_t dtype = static_cast<uint8_t>(p[44]);
  if (p[45] != std::byte{0} || p[46] != std::byte{0} || p[47] != std::byte{0}) {
    return Malformed(FrameType::kBegin, "non-zero reserved field");
  }
  if (layers == 0 || layers > kMaxWireLayers || heads == 0 || heads > kMaxWireKvHeads ||
      head_dim == 0 || head_dim > kMaxWireHeadDim) {
    return Malformed(FrameType::kBegin, absl::StrCat("layout ", layers, "x", heads, "x", head_dim,
                                                     " outside the wire limits"));
  }
  if (!ValidDType(dtype)) {
    return Malformed(FrameType::kBegin, absl::StrCat("unknown dtype ", dtype));
  }
  f.geometry = KvGeometry{static_cast<int32_t>(layers), static_cast<int32_t>(heads),
                          static_cast<int32_t>(head_dim)};
  f.dtype = static_cast<DType>(dtype);
  f.token_count = Get64(p + 48);
  f.start_position = Get64(p + 56);
  if (f.token_count == 0 || f.token_count > kMaxWireTokens) {
    return Malformed(FrameType::kBegin, absl::StrCat("token count ", f.token_count, " outside [1, ",
                                                     kMaxWireTokens, "]"));
  }
  if (f.start_position > kMaxWirePosition) {
    return Malformed(FrameType::kBegin, "start position beyond the wire limit");
  }
  return f;
}

absl::StatusOr<Frame> DecodeLayer(std::span<const std::byte> b) {
  absl::StatusOr<LayerHeader> h = DecodeLayerHeader(b, b.size());
  if (!h.ok()) {
    return h.status();
  }
  LayerFrame f;
  f.transfer_id = h->transfer_id;
  f.layer = h->layer;
  f.token_count = h->token_count;
  f.first_token = h->first_token;
  f.checksum = h->checksum;
  f.k = b.subspan(kLayerFixedBytes, h->tensor_bytes);
  f.v = b.subspan(kLayerFixedBytes + h->tensor_bytes, h->tensor_bytes);
  return f;
}

absl::StatusOr<Frame> DecodeEnd(std::span<const std::byte> b) {
  if (b.size() != kEndBodyBytes) {
    return Malformed(FrameType::kEnd,
                     absl::StrCat("body is ", b.size(), " bytes, expected ", kEndBodyBytes));
  }
  EndFrame f;
  f.transfer_id = Get64(b.data());
  f.first_token = static_cast<int32_t>(Get32(b.data() + 8));
  const uint32_t bits = Get32(b.data() + 12);
  std::memcpy(&f.logprob, &bits, 4);
  return f;
}

absl::StatusOr<std::string_view> DecodeText(FrameType type, std::span<const std::byte> b,
                                            size_t fixed, uint16_t text_bytes) {
  if (text_bytes > kMaxTextBytes || b.size() - fixed != text_bytes) {
    return Malformed(type, "text length does not match the body");
  }
  return std::string_view(reinterpret_cast<const char*>(b.data() + fixed), text_bytes);
}

absl::StatusOr<Frame> DecodeAbort(std::span<const std::byte> b) {
  if (b.size() < kAbortFixedBytes) {
    return Malformed(FrameType::kAbort, "body shorter than its fixed part");
  }
  AbortFrame f;
  f.transfer_id = Get64(b.data());
  const uint16_t reason = Get16(b.data() + 8);
  f.reason =
      reason < kNumTransferErrors ? static_cast<TransferError>(reason) : TransferError::kOther;
  if (Get32(b.data() + 12) != 0) {
    return Malformed(FrameType::kAbort, "non-zero reserved field");
  }
  absl::StatusOr<std::string_view> text =
      DecodeText(FrameType::kAbort, b, kAbortFixedBytes, Get16(b.data() + 10));
  if (!text.ok()) {
    return text.status();
  }
  f.text = *text;
  return f;
}

absl::StatusOr<Frame> DecodeResult(std::span<const std::byte> b) {
  if (b.size() < kResultFixedBytes) {
    return Malformed(FrameType::kResult, "body shorter than its fixed part");
  }
  ResultFrame f;
  f.transfer_id = Get64(b.data());
  const uint16_t code = Get16(b.data() + 8);
  f.code = code <= static_cast<uint16_t>(absl::StatusCode::kUnauthenticated)
               ? static_cast<absl::StatusCode>(code)
               : absl::StatusCode::kUnknown;
  const uint16_t reason = Get16(b.data() + 10);
  f.reason =
      reason < kNumTransferErrors ? static_cast<TransferError>(reason) : TransferError::kOther;
  if (Get16(b.data() + 14) != 0) {
    return Malformed(FrameType::kResult, "non-zero reserved field");
  }
  if ((f.code == absl::StatusCode::kOk) != (f.reason == TransferError::kOk)) {
    return Malformed(FrameType::kResult, "status code and reason disagree about success");
  }
  absl::StatusOr<std::string_view> text =
      DecodeText(FrameType::kResult, b, kResultFixedBytes, Get16(b.data() + 12));
  if (!text.ok()) {
    return text.status();
  }
  f.text = *text;
  return f;
}

}  // namespace

absl::StatusOr<Frame> DecodeFrameBody(FrameType type, std::span<const std::byte> body) {
  switch (type) {
    case FrameType::kHello:
      return DecodeHello(body);
    case FrameType::kBegin:
      return DecodeBegin(body);
    case FrameType::kLayer:
      return DecodeLayer(body);
    case FrameType::kEnd:
      return DecodeEnd(body);
    case FrameType::kAbort:
      return DecodeAbort(body);
    case FrameType::kResult:
      return DecodeResult(body);
  }
  return absl::InvalidArgumentError("unknown frame type");
}

absl::StatusOr<Frame> Decode(std::span<const std::byte> frame, uint32_t max_frame_bytes) {
  absl::StatusOr<FrameHeader> h = DecodeFrameHeader(frame, max_frame_bytes);
  if (!h.ok()) {
    return h.status();
  }
  if (frame.size() - kFrameHeaderBytes != h->body_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "frame is ", frame.size(), " bytes, header says ", kFrameHeaderBytes + h->body_bytes));
  }
  return DecodeFrameBody(h->type, frame.subspan(kFrameHeaderBytes));
}

FrameDecoder::FrameDecoder(uint32_t max_frame_bytes)
    : max_frame_bytes_(std::min(max_frame_bytes, kMaxFrameBytesLimit)) {}

absl::StatusOr<FrameDecoder::Result> FrameDecoder::Next(std::span<const std::byte>& input,
                                                        RawFrame* frame) {
  if (state_ == State::kError) {
    return absl::FailedPreconditionError("frame decoder is in its error state");
  }
  if (state_ == State::kHeader) {
    if (input.size() < kFrameHeaderBytes) {
      bytes_needed_ = kFrameHeaderBytes;
      return Result::kNeedMore;
    }
    absl::StatusOr<FrameHeader> h = DecodeFrameHeader(input, max_frame_bytes_);
    if (!h.ok()) {
      state_ = State::kError;
      return h.status();
    }
    header_ = *h;
    state_ = State::kBody;
    bytes_needed_ = kFrameHeaderBytes + static_cast<size_t>(header_.body_bytes);
  }
  // kBody: the header at the front of `input` has been validated.
  if (input.size() < bytes_needed_) {
    return Result::kNeedMore;
  }
  frame->type = header_.type;
  frame->body = input.subspan(kFrameHeaderBytes, header_.body_bytes);
  input = input.subspan(bytes_needed_);
  state_ = State::kHeader;
  bytes_needed_ = kFrameHeaderBytes;
  return Result::kFrame;
}

}  // namespace tandem
