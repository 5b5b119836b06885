// KV data-plane wire format (docs/kv-wire-format.md is the contract): frame layouts, Encode /
// Decode / EncodedSize for each frame, and an incremental framing decoder. No I/O here.
//
// Every frame is a fixed 16-byte header followed by a body. All integers are little-endian.
//
//   Frame header (16 bytes)
//    0       4    5    6         8                  12                 16
//   +--------+----+----+---------+------------------+------------------+
//   | magic  |ver |type| flags=0 |    body_bytes    |   reserved = 0   |
//   | "TDKV" | u8 | u8 |   u16   |       u32        |       u32        |
//   +--------+----+----+---------+------------------+------------------+
//
//   HELLO  (type 1, body 16 + auth_bytes)
//    0        2      3      4            6            8                    16
//   +--------+------+------+------------+------------+--------------------+------------+
//   |version | role | rsv  | auth_bytes |  rsv = 0   |   incarnation_id   | auth ...   |
//   |  u16   |  u8  |  u8  |    u16     |    u16     |        u64         | auth_bytes |
//   +--------+------+------+------------+------------+--------------------+------------+
//
//   BEGIN  (type 2, body 64)
//    0             8                 24            32       36       40       44   45     48
//   +-------------+-----------------+-------------+--------+--------+--------+----+------+
//   | transfer_id |  token (16 B)   | fingerprint | layers | kv_hds |head_dim|dtyp| rsv  |
//   |     u64     |                 |     u64     |  u32   |  u32   |  u32   | u8 | 3 B  |
//   +-------------+-----------------+-------------+--------+--------+--------+----+------+
//    48            56              64
//   +-------------+---------------+
//   | token_count | start_position|
//   |     u64     |      u64      |
//   +-------------+---------------+
//
//   LAYER  (type 3, body 40 + 2 * tensor_bytes)
//    0             8       12            16            24             32         40
//   +-------------+-------+-------------+-------------+--------------+----------+-----+-----+
//   | transfer_id | layer | token_count | first_token | tensor_bytes | checksum |  K  |  V  |
//   |     u64     |  u32  |     u32     |     u64     |     u64      |   u64    |     |     |
//   +-------------+-------+-------------+-------------+--------------+----------+-----+-----+
//   K and V: tensor_bytes each, canonical layout [token_count][kv_heads][head_dim] of the dtype
//   named in BEGIN. checksum = XXH3-64 (seed 0) of the byte string K || V.
//
//   END    (type 4, body 16)
//    0             8             12          16
//   +-------------+-------------+-----------+
//   | transfer_id | first_token |  logprob  |
//   |     u64     |     i32     | f32 (IEEE)|
//   +-------------+-------------+-----------+
//
//   ABORT  (type 5, body 16 + text_bytes)
//    0             8        10           12         16
//   +-------------+--------+------------+----------+------------+
//   | transfer_id | reason | text_bytes | rsv = 0  | text ...   |
//   |     u64     |  u16   |    u16     |   u32    | text_bytes |
//   +-------------+--------+------------+----------+------------+
//
//   RESULT (type 6, body 16 + text_bytes), receiver -> sender
//    0             8        10       12           14        16
//   +-------------+--------+--------+------------+---------+------------+
//   | transfer_id |  code  | reason | text_bytes | rsv = 0 | text ...   |
//   |     u64     |  u16   |  u16   |    u16     |   u16   | text_bytes |
//   +-------------+--------+--------+------------+---------+------------+
//   code: absl::StatusCode of the outcome; reason: TransferError. RESULT answers END (success or
//   failure), acknowledges ABORT, and reports a transfer the receiver ended on its own.
//
// Decoding checks only what a frame says about itself (sizes, reserved fields, enum values,
// limits); whether a frame fits its transfer (layer index, token range, byte counts against the
// layout) is checked by the receiver (kvcache/kv_landing.h).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <variant>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvcache/dtype.h"
#include "kvcache/kv_store.h"

namespace tandem {

// ---- Wire constants (defined once; docs/kv-wire-format.md mirrors them) ----
inline constexpr uint32_t kWireMagic = 0x564B4454;  // bytes "TDKV"
inline constexpr uint8_t kWireVersion = 1;
inline constexpr size_t kFrameHeaderBytes = 16;
inline constexpr size_t kHelloFixedBytes = 16;
inline constexpr size_t kBeginBodyBytes = 64;
inline constexpr size_t kLayerFixedBytes = 40;
inline constexpr size_t kLayerPrefixBytes = kFrameHeaderBytes + kLayerFixedBytes;  // before K
inline constexpr size_t kEndBodyBytes = 16;
inline constexpr size_t kAbortFixedBytes = 16;
inline constexpr size_t kResultFixedBytes = 16;
inline constexpr size_t kTransferTokenBytes = 16;
inline constexpr size_t kMaxAuthBytes = 256;
inline constexpr size_t kMaxTextBytes = 1024;
// Whole frame (header + body). Receivers may configure a smaller limit, never a larger one.
inline constexpr uint32_t kDefaultMaxFrameBytes = 64u << 20;
inline constexpr uint32_t kMaxFrameBytesLimit = 1u << 30;
// Layout limits a BEGIN may announce.
inline constexpr uint32_t kMaxWireLayers = 1024;
inline constexpr uint32_t kMaxWireKvHeads = 1024;
inline constexpr uint32_t kMaxWireHeadDim = 4096;
inline constexpr uint64_t kMaxWireTokens = 1ull << 24;
inline constexpr uint64_t kMaxWirePosition = 1ull << 40;

enum class FrameType : uint8_t {
  kHello = 1,
  kBegin = 2,
  kLayer = 3,
  kEnd = 4,
  kAbort = 5,
  kResult = 6,
};
std::string_view FrameTypeName(FrameType t);

enum class PeerRole : uint8_t { kSender = 1, kReceiver = 2 };

// Why a transfer ended. Values travel in ABORT and RESULT frames: never renumber.
enum class TransferError : uint16_t {
  kOk = 0,
  kMalformedFrame = 1,        // a frame's body failed to decode
  kProtocolViolation = 2,     // a well-formed frame at the wrong time (BEGIN twice, HELLO late)
  kUnknownTransfer = 3,       // no expected transfer with this id
  kBadToken = 4,              // BEGIN carried a token other than the one the receiver issued
  kFingerprintMismatch = 5,   // BEGIN's model fingerprint differs from the receiver's
  kLayoutMismatch = 6,        // geometry, token count or start position differs
  kLayerOutOfRange = 7,       // LAYER index >= layers
  kTokenRangeOutOfRange = 8,  // LAYER token range outside the transfer, or a gap in a layer
  kDuplicateLayer = 9,        // LAYER range already received
  kSizeMismatch = 10,         // LAYER K/V byte count != token_count * kv_heads * head_dim * dtype
  kChecksumMismatch = 11,     // LAYER checksum did not verify
  kIncomplete = 12,           // END before every layer x token range arrived
  kDeadlineExceeded = 13,     // the transfer's deadline passed
  kPeerDisconnected = 14,     // the connection closed or failed mid-transfer
  kAbortedBySender = 15,      // ABORT from the sender
  kCancelledByReceiver = 16,  // the decode side cancelled (client gone, deadline)
  kStoreWriteFailed = 17,     // the KV store refused the write
  kShutdown = 18,             // the endpoint is shutting down
  kWriteTimeout = 19,         // the peer stopped reading (sender side)
  kConnectFailed = 20,        // could not connect or handshake (sender side)
  kAuthFailed = 21,           // HELLO auth or version refused
  kIncarnationMismatch = 22,  // the receiver is not the incarnation the ticket named
  kInvalidArgument = 23,      // local misuse of the sender API (never sent by a receiver)
  kOther = 24,                // a reason code this build does not know
};
inline constexpr int kNumTransferErrors = 25;
std::string_view TransferErrorName(TransferError e);
// The status a transfer ending for `reason` reports: a fixed code per reason, message
// "<reason name>: <detail>".
absl::Status TransferStatus(TransferError reason, std::string_view detail);
// The status code that goes with each reason (kOk -> OK).
absl::StatusCode TransferErrorCode(TransferError reason);

using TransferToken = std::array<uint8_t, kTransferTokenBytes>;

// ---- Frames (decoded views: spans/string_views point into the decoded buffer) ----
struct HelloFrame {
  uint16_t protocol_version = kWireVersion;
  PeerRole role = PeerRole::kSender;
  uint64_t incarnation_id = 0;
  std::string_view auth;  // <= kMaxAuthBytes
};

struct BeginFrame {
  uint64_t transfer_id = 0;
  TransferToken token{};
  uint64_t model_fingerprint = 0;
  KvGeometry geometry;
  DType dtype = DType::kBF16;
  uint64_t token_count = 0;
  uint64_t start_position = 0;
};

struct LayerFrame {
  uint64_t transfer_id = 0;
  uint32_t layer = 0;
  uint32_t token_count = 0;
  uint64_t first_token = 0;  // relative to the transfer's first token
  uint64_t checksum = 0;
  std::span<const std::byte> k;  // tensor_bytes each
  std::span<const std::byte> v;
};

struct EndFrame {
  uint64_t transfer_id = 0;
  int32_t first_token = 0;
  float logprob = 0.0f;
};

struct AbortFrame {
  uint64_t transfer_id = 0;
  TransferError reason = TransferError::kAbortedBySender;
  std::string_view text;  // <= kMaxTextBytes
};

struct ResultFrame {
  uint64_t transfer_id = 0;  // 0: about the connection (e.g. HELLO refused)
  absl::StatusCode code = absl::StatusCode::kOk;
  TransferError reason = TransferError::kOk;
  std::string_view text;  // <= kMaxTextBytes
};

using Frame = std::variant<HelloFrame, BeginFrame, LayerFrame, EndFrame, AbortFrame, ResultFrame>;

// XXH3-64 (seed 0) of K || V, as carried in LAYER. On x86-64 the widest vector unit of the CPU is
// picked at run time (AVX-512/AVX2/SSE2), whatever the build targets.
uint64_t LayerChecksum(std::span<const std::byte> k, std::span<const std::byte> v);

// The same checksum fed piecewise, for code that verifies (or produces) a payload while it is
// still hot in cache: Update() with consecutive pieces of K || V, in order, then Digest().
// No allocation; reusable after Reset().
class LayerChecksumStream {
 public:
  LayerChecksumStream() { Reset(); }
  void Reset();
  void Update(std::span<const std::byte> bytes);
  uint64_t Digest() const;

 private:
  // An XXH3_state_t (xxhash.h stays out of this header; the .cc checks size and alignment).
  alignas(64) unsigned char state_[576];
};

// ---- Encoding. EncodedSize is the whole frame (header + body). Encode writes exactly that many
// bytes into `out` (which must be at least that large) and returns the count. Text and auth longer
// than the wire limits are truncated.
size_t EncodedSize(const HelloFrame& f);
size_t EncodedSize(const BeginFrame& f);
size_t EncodedSize(const LayerFrame& f);  // includes K and V
size_t EncodedSize(const EndFrame& f);
size_t EncodedSize(const AbortFrame& f);
size_t EncodedSize(const ResultFrame& f);
size_t Encode(const HelloFrame& f, std::span<std::byte> out);
size_t Encode(const BeginFrame& f, std::span<std::byte> out);
size_t Encode(const LayerFrame& f, std::span<std::byte> out);  // copies K and V after the prefix
size_t Encode(const EndFrame& f, std::span<std::byte> out);
size_t Encode(const AbortFrame& f, std::span<std::byte> out);
size_t Encode(const ResultFrame& f, std::span<std::byte> out);
// LAYER without its payload: the kLayerPrefixBytes that precede K, for scatter-gather writes
// (prefix, K, V) straight from the caller's buffers. f.k/f.v sizes must be equal.
void EncodeLayerPrefix(const LayerFrame& f, std::span<std::byte, kLayerPrefixBytes> out);
// Overwrites the checksum field of an encoded LAYER prefix, for senders that compute it just
// before the frame goes out (when the payload is about to be read by the kernel anyway).
void SetLayerPrefixChecksum(std::span<std::byte, kLayerPrefixBytes> prefix, uint64_t checksum);
// Largest text an ABORT/RESULT frame can carry, for fixed-size encode buffers.
inline constexpr size_t kMaxControlFrameBytes =
    kFrameHeaderBytes + kResultFixedBytes + kMaxTextBytes;

// ---- Decoding ----
struct FrameHeader {
  FrameType type = FrameType::kHello;
  uint32_t body_bytes = 0;
};
// Decodes the 16-byte header at the start of `in` (in.size() >= kFrameHeaderBytes). Rejects a bad
// magic, version, type, non-zero reserved fields, and a frame larger than `max_frame_bytes`.
absl::StatusOr<FrameHeader> DecodeFrameHeader(std::span<const std::byte> in,
                                              uint32_t max_frame_bytes);
// Decodes a body of `type` (exactly body_bytes long). Views in the result point into `body`.
absl::StatusOr<Frame> DecodeFrameBody(FrameType type, std::span<const std::byte> body);
// Header + body of one complete frame that is exactly `frame.size()` bytes.
absl::StatusOr<Frame> Decode(std::span<const std::byte> frame,
                             uint32_t max_frame_bytes = kDefaultMaxFrameBytes);
// A LAYER body's fixed part, decoded before its payload has been read, for receivers that read
// K and V straight into their destination (kvcache/kv_landing.h, KvLanding::BeginLayer).
struct LayerHeader {
  uint64_t transfer_id = 0;
  uint32_t layer = 0;
  uint32_t token_count = 0;
  uint64_t first_token = 0;
  uint64_t tensor_bytes = 0;  // of K, and of V; the payload that follows is twice this
  uint64_t checksum = 0;
};
// Decodes the kLayerFixedBytes at the start of `fixed` of a LAYER body that is `body_bytes` long
// in total. Applies exactly the checks DecodeFrameBody applies to a whole LAYER body.
absl::StatusOr<LayerHeader> DecodeLayerHeader(std::span<const std::byte> fixed,
                                              uint64_t body_bytes);

// The transfer a body is about (first 8 bytes of BEGIN/LAYER/END/ABORT/RESULT), if long enough;
// lets a receiver blame the right transfer for a body that fails to decode.
std::optional<uint64_t> PeekTransferId(FrameType type, std::span<const std::byte> body);

// A frame cut out of the byte stream, not yet decoded: its body points into the caller's input.
struct RawFrame {
  FrameType type = FrameType::kHello;
  std::span<const std::byte> body;
};

// Incremental framing decoder: finds frame boundaries in a byte stream without copying.
//
// Buffer contract: `input` is the not-yet-consumed front of the stream, owned by the caller.
// - Returns kFrame: `*frame` is the next frame (its body points into `input`, valid while the
//   caller keeps those bytes) and `input` is advanced past it (consumed).
// - Returns kNeedMore: `input` is untouched; the caller appends bytes and calls again with the
//   same front. bytes_needed() says how many bytes, from the front, the pending frame needs (16
//   before the header is known, header + body after), so transports can read exactly that much.
// - Returns an error: `input` is untouched, the decoder moves to kError and stays there: the
//   stream is desynchronised and the connection must be closed.
// A body that is well framed but invalid is not a framing error; DecodeFrameBody reports it.
class FrameDecoder {
 public:
  enum class State { kHeader, kBody, kError };
  enum class Result { kNeedMore, kFrame };

  explicit FrameDecoder(uint32_t max_frame_bytes = kDefaultMaxFrameBytes);

  absl::StatusOr<Result> Next(std::span<const std::byte>& input, RawFrame* frame);

  State state() const { return state_; }
  size_t bytes_needed() const { return bytes_needed_; }
  uint32_t max_frame_bytes() const { return max_frame_bytes_; }

 private:
  uint32_t max_frame_bytes_;
  State state_ = State::kHeader;
  FrameHeader header_;  // valid in kBody
  size_t bytes_needed_ = kFrameHeaderBytes;
};

// Constant-time comparison of transfer tokens.
bool TokensEqual(const TransferToken& a, const TransferToken& b);

}  // namespace tandem
