// KV sender over Boost.Asio: connection pool per peer, a bounded frame ring per connection drained
// by scatter-gather writes, RESULT reads, per-transfer deadlines and write timeouts.
#include "kvcache/transport/kv_client.h"

#include <array>
#include <atomic>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <cstring>
#include <map>
#include <thread>
#include <unordered_map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kvcache/internal/strings.h"
#include "kvcache/transport/internal/stream.h"
#include "kvcache/transport/internal/tls_context.h"

namespace tandem {
namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using boost::system::error_code;

namespace {

class ClientConnection;
using Strand = asio::strand<asio::io_context::executor_type>;

// Bytes of the inline frame head: LAYER prefix (56), BEGIN (80), END (32), ABORT with a short text.
constexpr size_t kHeadBytes = 160;
constexpr size_t kMaxAbortText = kHeadBytes - kFrameHeaderBytes - kAbortFixedBytes;
constexpr size_t kMaxBatchFrames = 64;
constexpr size_t kMaxBatchBytes = 16u << 20;
// A batch whose LAYER checksums are computed just before it is written stops growing at this
// many bytes (but takes at least one frame): the hash pulls the payload into cache and the
// kernel's copy into the socket should still find it there.
constexpr size_t kMaxHashedBatchBytes = 1u << 20;
constexpr uint32_t kMaxResultFrameBytes = 64u << 10;

// Client-side state of one transfer. Fields marked (mu) are guarded by the owning connection's
// mutex; the sequencer belongs to the OutgoingTransfer's caller.
struct ClientTransfer {
  ClientTransfer(const OutgoingTransferSpec& s, TransferAckCallback cb, Strand& strand)
      : id(s.transfer_id),
        deadline(s.deadline),
        receiver_incarnation(s.receiver_incarnation),
        on_done(std::move(cb)),
        sequencer(s),
        timer(strand) {}

  const uint64_t id;
  const std::chrono::steady_clock::time_point deadline;
  const uint64_t receiver_incarnation;
  TransferAckCallback on_done;  // (mu) taken when the transfer completes
  bool done = false;            // (mu)
  absl::Status status;          // (mu) final status once done
  internal::SendSequencer sequencer;
  asio::steady_timer timer;  // deadline; touched on the strand only
};

// One queued frame: an inline head, then optionally K and V from the caller's memory.
struct OutFrame {
  std::array<std::byte, kHeadBytes> head;
  size_t head_len = 0;
  const std::byte* k = nullptr;
  const std::byte* v = nullptr;
  size_t kv_len = 0;  // bytes of K (= bytes of V)
  std::shared_ptr<const void> keep_alive;
  std::shared_ptr<ClientTransfer> transfer;
  bool droppable = true;  // skipped once its transfer is done (all but ABORT)
  // LAYER whose checksum is computed on the strand just before the frame is written.
  bool checksum_pending = false;
  size_t bytes() const { return head_len + 2 * kv_len; }
};

// Fixed-capacity FIFO: elements never move while queued, so a write in flight can point into them.
class FrameRing {
 public:
  explicit FrameRing(size_t capacity) : slots_(std::max<size_t>(capacity, 8)) {}
  size_t size() const { return size_; }
  size_t capacity() const { return slots_.size(); }
  bool full() const { return size_ == slots_.size(); }
  OutFrame& at(size_t i) { return slots_[(head_ + i) % slots_.size()]; }
  void push_back(OutFrame&& f) {
    slots_[(head_ + size_) % slots_.size()] = std::move(f);
    ++size_;
  }
  // Moves the front's references out so they are dropped outside the lock.
  void pop_front(std::vector<std::shared_ptr<const void>>& drop) {
    OutFrame& f = slots_[head_];
    drop.push_back(std::move(f.keep_alive));
    f.keep_alive.reset();
    f.transfer.reset();
    head_ = (head_ + 1) % slots_.size();
    --size_;
  }

 private:
  std::vector<OutFrame> slots_;
  size_t head_ = 0;
  size_t size_ = 0;
};

std::optional<std::pair<std::string, std::string>> SplitHostPort(const std::string& peer) {
  const size_t colon = peer.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == peer.size()) {
    return std::nullopt;
  }
  std::string host = peer.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  return std::make_pair(host, peer.substr(colon + 1));
}

}  // namespace

class KvClient::Impl {
 public:
  explicit Impl(KvClientOptions options)
      : options_(std::move(options)), work_(asio::make_work_guard(io_)) {}
  ~Impl();

  absl::Status Init();
  std::shared_ptr<ClientConnection> Pick(const std::string& peer, bool fresh);

  const KvClientOptions options_;
  asio::io_context io_;
  asio::executor_work_guard<asio::io_context::executor_type> work_;
  std::unique_ptr<asio::ssl::context> tls_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> bytes_sent_{0};
  std::atomic<uint64_t> frames_sent_{0};
  std::atomic<uint64_t> connections_opened_{0};
  std::atomic<uint64_t> late_results_{0};
  mutable absl::Mutex mu_;
  std::map<std::string, std::vector<std::shared_ptr<ClientConnection>>> pool_ ABSL_GUARDED_BY(mu_);
};

namespace {

class ClientConnection final : public std::enable_shared_from_this<ClientConnection> {
 public:
  enum class State { kConnecting, kReady, kClosed };

  ClientConnection(KvClient::Impl& client, std::string peer)
      : client_(client),
        peer_(std::move(peer)),
        strand_(asio::make_strand(client.io_)),
        resolver_(strand_),
        stream_(tcp::socket(strand_), client.tls_.get()),
        connect_timer_(strand_),
        write_timer_(strand_),
        decoder_(kMaxResultFrameBytes),
        ring_(client.options_.max_queued_frames) {
    read_buf_.resize(kMaxResultFrameBytes);
    batch_.reserve(3 * kMaxBatchFrames);
    to_hash_.reserve(kMaxBatchFrames);
    drop_.reserve(kMaxBatchFrames);
  }

  Strand& strand() { return strand_; }

  bool closed() const {
    absl::MutexLock lock(&mu_);
    return state_ == State::kClosed;
  }
  size_t active() const {
    absl::MutexLock lock(&mu_);
    return transfers_.size();
  }

  // Connects on first use (after the first transfer is registered, so that a connection that
  // fails at once still reports through that transfer's on_done).
  void EnsureStarted() {
    if (!started_.exchange(true)) {
      asio::dispatch(strand_, [self = shared_from_this()] { self->Connect(); });
    }
  }

  // Registers the transfer and queues BEGIN, atomically: on error nothing was registered, so
  // on_done never fires.
  absl::Status AddTransfer(const std::shared_ptr<ClientTransfer>& t, const BeginFrame& begin) {
    OutFrame f;
    f.head_len = Encode(begin, f.head);
    f.transfer = t;
    {
      absl::MutexLock lock(&mu_);
      if (state_ == State::kClosed) {
        return close_status_;
      }
      if (transfers_.count(t->id) != 0) {
        return absl::AlreadyExistsError(absl::StrCat("transfer ", t->id, " in progress"));
      }
      if (state_ == State::kReady && t->receiver_incarnation != 0 &&
          t->receiver_incarnation != server_incarnation_) {
        return TransferStatus(TransferError::kIncarnationMismatch,
                              absl::StrCat("receiver incarnation ", server_incarnation_,
                                           " != ticket's ", t->receiver_incarnation));
      }
      if (ring_.full()) {
        return absl::ResourceExhaustedError(
            absl::StrCat("send queue to ", peer_, " is full; retry later"));
      }
      transfers_.emplace(t->id, t);
      queued_bytes_ += f.bytes();
      ring_.push_back(std::move(f));
      KickLocked();
    }
    asio::post(strand_, [self = shared_from_this(), t] { self->ArmDeadline(t); });
    return absl::OkStatus();
  }

  // Queues a LAYER frame, waiting for room (backpressure).
  absl::Status EnqueueLayer(const std::shared_ptr<ClientTransfer>& t, const LayerFrame& lf,
                            const std::shared_ptr<const void>& keep_alive) {
    OutFrame f;
    EncodeLayerPrefix(lf,
                      std::span<std::byte, kLayerPrefixBytes>(f.head.data(), kLayerPrefixBytes));
    f.head_len = kLayerPrefixBytes;
    f.checksum_pending = true;  // StartWrite
    f.k = lf.k.data();
    f.v = lf.v.data();
    f.kv_len = lf.k.size();
    f.keep_alive = keep_alive;
    f.transfer = t;
    return Enqueue(t, std::move(f));
  }

  absl::Status EnqueueEnd(const std::shared_ptr<ClientTransfer>& t, const EndFrame& end) {
    OutFrame f;
    f.head_len = Encode(end, f.head);
    f.transfer = t;
    return Enqueue(t, std::move(f));
  }

  // Queues ABORT (never blocks; dropped only if the ring is completely full, in which case the
  // receiver's own deadline reclaims the transfer).
  void EnqueueAbort(const std::shared_ptr<ClientTransfer>& t, TransferError reason,
                    std::string_view text) {
    AbortFrame a;
    a.transfer_id = t->id;
    a.reason = reason;
    a.text = text.substr(0, kMaxAbortText);
    OutFrame f;
    f.head_len = Encode(a, f.head);
    f.transfer = t;
    f.droppable = false;
    absl::MutexLock lock(&mu_);
    if (state_ == State::kClosed || ring_.full()) {
      return;
    }
    queued_bytes_ += f.bytes();
    ring_.push_back(std::move(f));
    KickLocked();
  }

  // Ends the transfer once: fires on_done outside the lock.
  void Complete(const std::shared_ptr<ClientTransfer>& t, absl::Status status,
                TransferError reason) {
    TransferAckCallback cb;
    {
      absl::MutexLock lock(&mu_);
      if (t->done) {
        return;
      }
      t->done = true;
      t->status = status;
      cb = std::move(t->on_done);
      transfers_.erase(t->id);
      cv_.SignalAll();
    }
    asio::post(strand_, [t] { t->timer.cancel(); });
    if (cb) cb(TransferAck{t->id, std::move(status), reason});
  }

  // The transfer's failure once it has ended, OK while live.
  absl::Status Ended(const ClientTransfer& t) const {
    absl::MutexLock lock(&mu_);
    if (!t.done) return absl::OkStatus();
    return t.status.ok() ? absl::FailedPreconditionError("transfer already completed") : t.status;
  }

  // Closes the connection; every transfer on it ends with `reason`.
  void Fail(TransferError reason, const std::string& why) {
    std::unordered_map<uint64_t, std::shared_ptr<ClientTransfer>> transfers;
    std::vector<std::shared_ptr<const void>> drop;
    {
      absl::MutexLock lock(&mu_);
      if (state_ == State::kClosed) {
        return;
      }
      state_ = State::kClosed;
      close_status_ = TransferStatus(reason, absl::StrCat("connection to ", peer_, ": ", why));
      transfers.swap(transfers_);
      if (!writing_) {
        while (ring_.size() > 0) ring_.pop_front(drop);
        queued_bytes_ = 0;
      }
      cv_.SignalAll();
    }
    asio::post(strand_, [self = shared_from_this()] {
      self->stream_.Close();
      self->resolver_.cancel();
      self->connect_timer_.cancel();
      self->write_timer_.cancel();
    });
    for (auto& [id, t] : transfers) {
      Complete(t, TransferStatus(reason, absl::StrCat("connection to ", peer_, ": ", why)), reason);
    }
  }

 private:
  absl::Status Enqueue(const std::shared_ptr<ClientTransfer>& t, OutFrame&& f) {
    const size_t bytes = f.bytes();
    const auto now = std::chrono::steady_clock::now();
    const auto wait_until = std::min(t->deadline, now + client_.options_.write_timeout);
    absl::MutexLock lock(&mu_);
    bool timed_out = false;
    while (state_ != State::kClosed && !t->done &&
           (ring_.full() ||
            (queued_bytes_ > 0 && queued_bytes_ + bytes > client_.options_.max_inflight_bytes))) {
      const auto left = wait_until - std::chrono::steady_clock::now();
      if (left <= std::chrono::steady_clock::duration::zero() ||
          cv_.WaitWithTimeout(&mu_, absl::FromChrono(left))) {
        timed_out = true;
        break;
      }
    }
    if (t->done) {
      return t->status.ok() ? absl::FailedPreconditionError("transfer already completed")
                            : t->status;
    }
    if (state_ == State::kClosed) {
      return close_status_;
    }
    if (timed_out) {
      mu_.Unlock();
      const absl::Status s =
          TransferStatus(TransferError::kWriteTimeout,
                         absl::StrCat("no room on the connection to ", peer_, " within ",
                                      client_.options_.write_timeout.count(), " ms"));
      EnqueueAbort(t, TransferError::kWriteTimeout, "sender gave up waiting for the connection");
      Complete(t, s, TransferError::kWriteTimeout);
      mu_.Lock();
      return s;
    }
    queued_bytes_ += bytes;
    ring_.push_back(std::move(f));
    KickLocked();
    return absl::OkStatus();
  }

  void KickLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (state_ == State::kReady && !writing_) {
      writing_ = true;
      asio::post(strand_, [self = shared_from_this()] { self->StartWrite(); });
    }
  }

  void ArmDeadline(const std::shared_ptr<ClientTransfer>& t) {
    {
      absl::MutexLock lock(&mu_);
      if (t->done) return;
    }
    t->timer.expires_at(t->deadline);
    t->timer.async_wait([self = shared_from_this(), t](error_code ec) {
      if (ec) return;
      {
        absl::MutexLock lock(&self->mu_);
        if (t->done) return;
      }
      self->EnqueueAbort(t, TransferError::kDeadlineExceeded, "sender deadline passed");
      self->Complete(t,
                     TransferStatus(TransferError::kDeadlineExceeded, "transfer deadline passed"),
                     TransferError::kDeadlineExceeded);
    });
  }

  // ---- Connection set-up (strand) ----
  void Connect() {
    client_.connections_opened_++;
    connect_timer_.expires_after(client_.options_.connect_timeout);
    connect_timer_.async_wait([self = shared_from_this()](error_code ec) {
      if (!ec) self->Fail(TransferError::kConnectFailed, "connect/handshake timeout");
    });
    auto hp = SplitHostPort(peer_);
    if (!hp) {
      Fail(TransferError::kConnectFailed, "peer address is not host:port");
      return;
    }
    resolver_.async_resolve(
        hp->first, hp->second,
        [self = shared_from_this()](error_code ec, tcp::resolver::results_type results) {
          if (ec) {
            self->Fail(TransferError::kConnectFailed, absl::StrCat("resolve: ", ec.message()));
            return;
          }
          asio::async_connect(
              self->stream_.socket(), results,
              [self](error_code ec2, const tcp::endpoint&) { self->OnConnected(ec2); });
        });
  }

  void OnConnected(error_code ec) {
    if (ec) {
      Fail(TransferError::kConnectFailed, absl::StrCat("connect: ", ec.message()));
      return;
    }
    error_code ignored;
    stream_.socket().set_option(tcp::no_delay(true), ignored);
    if (!stream_.is_tls()) {
      SendHello();
      return;
    }
    const std::string& name = client_.options_.tls.server_name;
    if (!name.empty()) {
      SSL_set_tlsext_host_name(stream_.tls().native_handle(), name.c_str());
    }
    stream_.tls().async_handshake(asio::ssl::stream_base::client, [self = shared_from_this()](
                                                                      error_code ec2) {
      if (ec2) {
        self->Fail(TransferError::kConnectFailed, absl::StrCat("TLS handshake: ", ec2.message()));
        return;
      }
      self->SendHello();
    });
  }

  void SendHello() {
    HelloFrame h;
    h.role = PeerRole::kSender;
    h.incarnation_id = client_.options_.incarnation_id;
    h.auth = client_.options_.auth;
    hello_.resize(EncodedSize(h));
    Encode(h, hello_);
    stream_.AsyncWrite(asio::buffer(hello_), [self = shared_from_this()](error_code ec, size_t) {
      if (ec) self->Fail(TransferError::kConnectFailed, absl::StrCat("HELLO: ", ec.message()));
    });
    ReadHeader();
  }

  // ---- Reads (strand): HELLO reply, then RESULTs ----
  void ReadHeader() {
    stream_.AsyncRead(asio::buffer(read_buf_.data(), kFrameHeaderBytes),
                      [self = shared_from_this()](error_code ec, size_t) { self->OnHeader(ec); });
  }

  void OnHeader(error_code ec) {
    if (ec) {
      Fail(TransferError::kPeerDisconnected,
           ec == asio::error::eof ? "receiver closed the connection" : ec.message());
      return;
    }
    std::span<const std::byte> in(read_buf_.data(), kFrameHeaderBytes);
    RawFrame raw;
    auto r = decoder_.Next(in, &raw);
    if (!r.ok()) {
      Fail(TransferError::kMalformedFrame, std::string(r.status().message()));
      return;
    }
    if (*r == FrameDecoder::Result::kFrame) {
      HandleFrame(raw);
      return;
    }
    const size_t need = decoder_.bytes_needed();
    stream_.AsyncRead(asio::buffer(read_buf_.data() + kFrameHeaderBytes, need - kFrameHeaderBytes),
                      [self = shared_from_this(), need](error_code ec2, size_t) {
                        if (ec2) {
                          self->Fail(TransferError::kPeerDisconnected, ec2.message());
                          return;
                        }
                        std::span<const std::byte> all(self->read_buf_.data(), need);
                        RawFrame raw2;
                        auto r2 = self->decoder_.Next(all, &raw2);
                        if (!r2.ok() || *r2 != FrameDecoder::Result::kFrame) {
                          self->Fail(TransferError::kMalformedFrame, "decoder lost sync");
                          return;
                        }
                        self->HandleFrame(raw2);
                      });
  }

  void HandleFrame(const RawFrame& raw) {
    absl::StatusOr<Frame> frame = DecodeFrameBody(raw.type, raw.body);
    if (!frame.ok()) {
      Fail(TransferError::kMalformedFrame, std::string(frame.status().message()));
      return;
    }
    if (!hello_done_) {
      const auto* h = std::get_if<HelloFrame>(&*frame);
      if (h == nullptr) {
        // A receiver refusing our HELLO answers with a connection-level RESULT.
        if (const auto* r = std::get_if<ResultFrame>(&*frame);
            r != nullptr && r->transfer_id == 0) {
          Fail(r->reason == TransferError::kOk ? TransferError::kAuthFailed : r->reason,
               std::string(r->text));
        } else {
          Fail(TransferError::kProtocolViolation, "receiver did not answer HELLO");
        }
        return;
      }
      if (h->role != PeerRole::kReceiver || h->protocol_version != kWireVersion) {
        Fail(TransferError::kAuthFailed, "peer is not a receiver of our protocol version");
        return;
      }
      hello_done_ = true;
      connect_timer_.cancel();
      OnReady(h->incarnation_id);
    } else if (const auto* r = std::get_if<ResultFrame>(&*frame)) {
      OnResult(*r);
    } else {
      Fail(TransferError::kProtocolViolation,
           absl::StrCat("unexpected ", internal::Av(FrameTypeName(raw.type)), " from receiver"));
      return;
    }
    if (!closed()) ReadHeader();
  }

  void OnReady(uint64_t incarnation) {
    std::vector<std::shared_ptr<ClientTransfer>> mismatched;
    {
      absl::MutexLock lock(&mu_);
      if (state_ == State::kClosed) return;
      state_ = State::kReady;
      server_incarnation_ = incarnation;
      for (auto& [id, t] : transfers_) {
        if (t->receiver_incarnation != 0 && t->receiver_incarnation != incarnation) {
          mismatched.push_back(t);
        }
      }
    }
    // Their queued frames are skipped: nothing of theirs reaches the wrong incarnation.
    for (auto& t : mismatched) {
      Complete(t,
               TransferStatus(TransferError::kIncarnationMismatch,
                              absl::StrCat("receiver incarnation ", incarnation, " != ticket's ",
                                           t->receiver_incarnation)),
               TransferError::kIncarnationMismatch);
    }
    absl::MutexLock lock(&mu_);
    KickLocked();
  }

  void OnResult(const ResultFrame& r) {
    if (r.transfer_id == 0) {
      Fail(r.reason == TransferError::kOk ? TransferError::kOther : r.reason,
           absl::StrCat("receiver closed the connection: ", internal::Av(r.text)));
      return;
    }
    std::shared_ptr<ClientTransfer> t;
    {
      absl::MutexLock lock(&mu_);
      auto it = transfers_.find(r.transfer_id);
      if (it != transfers_.end()) t = it->second;
    }
    if (!t) {
      client_.late_results_++;  // e.g. the ack of an ABORT we already completed locally
      return;
    }
    Complete(t,
             r.reason == TransferError::kOk ? absl::OkStatus()
                                            : absl::Status(r.code, std::string(r.text)),
             r.reason);
  }

  // ---- Writes (strand) ----
  void StartWrite() {
    batch_.clear();
    batch_frames_ = 0;
    batch_bytes_ = 0;
    {
      absl::MutexLock lock(&mu_);
      if (state_ == State::kClosed) {
        writing_ = false;
        return;
      }
      size_t bytes = 0;
      size_t limit = kMaxBatchBytes;
      while (batch_frames_ < ring_.size() && batch_frames_ < kMaxBatchFrames && bytes < limit) {
        OutFrame& f = ring_.at(batch_frames_);
        ++batch_frames_;
        batch_bytes_ += f.bytes();
        if (f.droppable && f.transfer && f.transfer->done) {
          continue;  // the transfer ended: its remaining frames are not sent
        }
        batch_.emplace_back(f.head.data(), f.head_len);
        if (f.kv_len > 0) {
          batch_.emplace_back(f.k, f.kv_len);
          batch_.emplace_back(f.v, f.kv_len);
        }
        if (f.checksum_pending) {
          to_hash_.push_back(&f);
          limit = std::min(limit, kMaxHashedBatchBytes);
        }
        bytes += f.bytes();
      }
      if (batch_frames_ == 0) {
        writing_ = false;
        return;
      }
    }
    // Frames stay put while writing_ is set (only OnWrite pops them), so they can be finished
    // outside the lock. The checksum is computed here rather than in SendLayer: it stays off the
    // caller's (prefill compute) thread, and it reads each payload just before the kernel copies
    // it into the socket (the batch is kept small so that the bytes are still in cache).
    for (OutFrame* f : to_hash_) {
      SetLayerPrefixChecksum(
          std::span<std::byte, kLayerPrefixBytes>(f->head.data(), kLayerPrefixBytes),
          LayerChecksum(std::span<const std::byte>(f->k, f->kv_len),
                        std::span<const std::byte>(f->v, f->kv_len)));
      f->checksum_pending = false;
    }
    to_hash_.clear();
    if (batch_.empty()) {  // every frame in the batch was skipped
      OnWrite(error_code(), 0);
      return;
    }
    const uint64_t gen = ++write_gen_;
    write_timer_.expires_after(client_.options_.write_timeout);
    write_timer_.async_wait([self = shared_from_this(), gen](error_code ec) {
      if (!ec && self->write_gen_ == gen && self->write_pending_) {
        self->Fail(TransferError::kWriteTimeout, "receiver stopped reading (write timeout)");
      }
    });
    write_pending_ = true;
    stream_.AsyncWrite(
        batch_, [self = shared_from_this()](error_code ec, size_t n) { self->OnWrite(ec, n); });
  }

  void OnWrite(error_code ec, size_t written) {
    write_pending_ = false;
    write_timer_.cancel();
    client_.bytes_sent_ += written;
    bool more = false;
    {
      absl::MutexLock lock(&mu_);
      if (ec || state_ == State::kClosed) {
        while (ring_.size() > 0) ring_.pop_front(drop_);
        queued_bytes_ = 0;
      } else {
        client_.frames_sent_ += batch_frames_;
        for (size_t i = 0; i < batch_frames_; ++i) ring_.pop_front(drop_);
        queued_bytes_ -= batch_bytes_;
      }
      cv_.SignalAll();
      more = !ec && state_ == State::kReady && ring_.size() > 0;
      if (!more) writing_ = false;
    }
    drop_.clear();  // keep-alives released outside the lock
    if (ec) {
      Fail(TransferError::kPeerDisconnected, absl::StrCat("write: ", ec.message()));
      return;
    }
    if (more) StartWrite();
  }

  KvClient::Impl& client_;
  const std::string peer_;
  Strand strand_;
  tcp::resolver resolver_;
  internal::KvStream stream_;
  asio::steady_timer connect_timer_;
  asio::steady_timer write_timer_;
  // Strand-only state.
  FrameDecoder decoder_;
  std::vector<std::byte> read_buf_;
  std::vector<std::byte> hello_;
  std::vector<asio::const_buffer> batch_;
  std::vector<OutFrame*> to_hash_;  // frames of batch_ whose checksum is still to compute
  std::vector<std::shared_ptr<const void>> drop_;
  size_t batch_frames_ = 0;
  size_t batch_bytes_ = 0;
  bool hello_done_ = false;
  bool write_pending_ = false;
  uint64_t write_gen_ = 0;
  std::atomic<bool> started_{false};

  mutable absl::Mutex mu_;
  absl::CondVar cv_;  // room in the ring, a transfer ended, or the connection closed
  State state_ ABSL_GUARDED_BY(mu_) = State::kConnecting;
  absl::Status close_status_ ABSL_GUARDED_BY(mu_);
  uint64_t server_incarnation_ ABSL_GUARDED_BY(mu_) = 0;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  size_t queued_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  FrameRing ring_ ABSL_GUARDED_BY(mu_);
  std::unordered_map<uint64_t, std::shared_ptr<ClientTransfer>> transfers_ ABSL_GUARDED_BY(mu_);
};

class TcpOutgoingTransfer final : public OutgoingTransfer {
 public:
  TcpOutgoingTransfer(std::shared_ptr<ClientConnection> conn, std::shared_ptr<ClientTransfer> t,
                      int64_t token_count, uint64_t max_payload)
      : conn_(std::move(conn)),
        t_(std::move(t)),
        token_count_(token_count),
        max_payload_(max_payload) {}

  ~TcpOutgoingTransfer() override {
    if (!closed_) Abort(TransferError::kAbortedBySender, "transfer abandoned by the sender");
  }

  absl::Status SendLayer(LayerSlice slice) override {
    if (absl::Status s = conn_->Ended(*t_); !s.ok()) return s;
    if (closed_) return absl::FailedPreconditionError("transfer already finished or aborted");
    if (absl::Status s = t_->sequencer.Accept(slice); !s.ok()) return s;
    absl::Status status;
    internal::ForEachLayerFrame(t_->id, slice, t_->sequencer.token_bytes(), max_payload_,
                                internal::FrameChecksum::kDeferred, [&](const LayerFrame& f) {
                                  status = conn_->EnqueueLayer(t_, f, slice.keep_alive);
                                  return status.ok();
                                });
    return status;
  }

  absl::Status Finish(int32_t first_token, float logprob) override {
    if (absl::Status s = conn_->Ended(*t_); !s.ok()) return s;
    if (closed_) return absl::FailedPreconditionError("transfer already finished or aborted");
    if (absl::Status s = t_->sequencer.CheckComplete(); !s.ok()) return s;
    closed_ = true;
    return conn_->EnqueueEnd(t_, EndFrame{t_->id, first_token, logprob});
  }

  void Abort(TransferError reason, std::string_view text) override {
    closed_ = true;
    if (!conn_->Ended(*t_).ok()) return;
    conn_->EnqueueAbort(t_, reason, text);
  }

  uint64_t transfer_id() const override { return t_->id; }
  int64_t token_count() const override { return token_count_; }

 private:
  std::shared_ptr<ClientConnection> conn_;
  std::shared_ptr<ClientTransfer> t_;
  const int64_t token_count_;
  const uint64_t max_payload_;
  bool closed_ = false;
};

}  // namespace

absl::Status KvClient::Impl::Init() {
  if (options_.tls.enabled) {
    auto ctx = internal::MakeClientTlsContext(options_.tls);
    if (!ctx.ok()) return ctx.status();
    tls_ = std::move(*ctx);
  }
  for (int i = 0; i < std::max(1, options_.io_threads); ++i) {
    threads_.emplace_back([this] { io_.run(); });
  }
  return absl::OkStatus();
}

KvClient::Impl::~Impl() {
  std::vector<std::shared_ptr<ClientConnection>> all;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [peer, conns] : pool_) all.insert(all.end(), conns.begin(), conns.end());
  }
  for (auto& c : all) c->Fail(TransferError::kShutdown, "sender shutting down");
  work_.reset();
  io_.stop();
  for (auto& t : threads_) t.join();
  absl::MutexLock lock(&mu_);
  pool_.clear();
}

std::shared_ptr<ClientConnection> KvClient::Impl::Pick(const std::string& peer, bool fresh) {
  absl::MutexLock lock(&mu_);
  auto& conns = pool_[peer];
  std::erase_if(conns, [](const auto& c) { return c->closed(); });
  if (fresh || conns.size() < static_cast<size_t>(std::max(1, options_.connections_per_peer))) {
    auto c = std::make_shared<ClientConnection>(*this, peer);
    conns.push_back(c);
    return c;
  }
  std::shared_ptr<ClientConnection> best;
  size_t best_active = 0;
  for (auto& c : conns) {
    const size_t a = c->active();
    if (!best || a < best_active) {
      best = c;
      best_active = a;
    }
  }
  return best;
}

absl::StatusOr<std::unique_ptr<KvClient>> KvClient::Create(KvClientOptions options) {
  auto impl = std::make_unique<Impl>(std::move(options));
  if (absl::Status s = impl->Init(); !s.ok()) return s;
  return std::unique_ptr<KvClient>(new KvClient(std::move(impl)));
}

KvClient::KvClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
KvClient::~KvClient() = default;

absl::StatusOr<std::unique_ptr<OutgoingTransfer>> KvClient::Begin(const OutgoingTransferSpec& spec,
                                                                  TransferAckCallback on_done) {
  if (absl::Status s = internal::SendSequencer::ValidateSpec(spec); !s.ok()) return s;
  if (!SplitHostPort(spec.peer)) {
    return absl::InvalidArgumentError(absl::StrCat("peer '", spec.peer, "' is not host:port"));
  }
  BeginFrame b;
  b.transfer_id = spec.transfer_id;
  b.token = spec.token;
  b.model_fingerprint = spec.model_fingerprint;
  b.geometry = spec.geometry;
  b.dtype = spec.dtype;
  b.token_count = static_cast<uint64_t>(spec.token_count);
  b.start_position = static_cast<uint64_t>(spec.start_position);
  absl::Status last;
  // A pooled connection may close between Pick and AddTransfer: retry once on a fresh one.
  for (int attempt = 0; attempt < 2; ++attempt) {
    auto conn = impl_->Pick(spec.peer, /*fresh=*/attempt > 0);
    auto t = std::make_shared<ClientTransfer>(spec, on_done, conn->strand());
    last = conn->AddTransfer(t, b);
    conn->EnsureStarted();
    if (last.ok()) {
      return std::unique_ptr<OutgoingTransfer>(new TcpOutgoingTransfer(
          conn, t, spec.token_count, impl_->options_.max_frame_payload_bytes));
    }
    if (last.code() != absl::StatusCode::kUnavailable) break;
  }
  return last;
}

size_t KvClient::connection_count(const std::string& peer) const {
  absl::MutexLock lock(&impl_->mu_);
  auto it = impl_->pool_.find(peer);
  if (it == impl_->pool_.end()) return 0;
  size_t n = 0;
  for (const auto& c : it->second) n += c->closed() ? 0 : 1;
  return n;
}

KvClientStats KvClient::Stats() const {
  KvClientStats s;
  s.bytes_sent = impl_->bytes_sent_;
  s.frames_sent = impl_->frames_sent_;
  s.connections_opened = impl_->connections_opened_;
  s.late_results = impl_->late_results_;
  return s;
}

}  // namespace tandem
