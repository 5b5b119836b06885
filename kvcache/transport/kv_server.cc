// KV receiver over Boost.Asio: accept loop, per-connection framed reads (LAYER payloads straight
// into the KV store, other frames into a reusable buffer), RESULT writes with a timeout, and a
// periodic deadline reaper.
#include "kvcache/transport/kv_server.h"

#include <array>
#include <atomic>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <deque>
#include <thread>
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

class ServerConnection;

constexpr size_t kMaxQueuedResults = 4096;
// LAYER payload reads: at most this many destination spans (Asio's per-call iovec limit) and
// bytes per system call. Each read's bytes are hashed right after they land, so one read should
// stay within the L2 cache.
constexpr size_t kMaxReadSpans = 64;
constexpr size_t kMaxPayloadReadBytes = 512u << 10;
// Bytes one ReadPayload call reads before it yields the I/O thread to other connections.
constexpr size_t kPayloadBytesPerTurn = 8u << 20;

}  // namespace

class KvServer::Impl {
 public:
  Impl(KvLanding& landing, KvServerOptions options)
      : landing_(landing),
        options_(std::move(options)),
        work_(asio::make_work_guard(io_)),
        acceptor_(io_),
        reap_timer_(io_) {}

  absl::Status Init();
  void Stop();
  void Accept();
  void Reap();

  KvLanding& landing_;
  const KvServerOptions options_;
  asio::io_context io_;
  asio::executor_work_guard<asio::io_context::executor_type> work_;
  tcp::acceptor acceptor_;
  asio::steady_timer reap_timer_;
  std::unique_ptr<asio::ssl::context> tls_;
  std::vector<std::thread> threads_;
  tcp::endpoint bound_;
  std::atomic<bool> stopped_{false};
  std::atomic<size_t> live_connections_{0};
  absl::Mutex mu_;
  std::vector<std::weak_ptr<ServerConnection>> connections_ ABSL_GUARDED_BY(mu_);
};

namespace {

// One sender connection. Every member below is touched only on strand_, except through
// SendResult/PostClose, which post onto it.
class ServerConnection final : public ResultSink,
                               public std::enable_shared_from_this<ServerConnection> {
 public:
  ServerConnection(KvServer::Impl& server, tcp::socket socket)
      : server_(server),
        strand_(asio::make_strand(server.io_)),
        stream_(std::move(socket), server.tls_.get()),
        decoder_(server.options_.max_frame_bytes),
        handshake_timer_(server.io_),
        write_timer_(server.io_) {}

  void Start() {
    ++server_.live_connections_;
    error_code ignored;
    stream_.socket().set_option(tcp::no_delay(true), ignored);
    if (!stream_.is_tls()) {
      // LAYER payloads are read synchronously once the socket is readable (ReadPayload).
      stream_.socket().non_blocking(true, ignored);
    }
    peer_ = server_.landing_.AttachPeer(shared_from_this());
    asio::dispatch(strand_, [self = shared_from_this()] { self->OnStart(); });
  }

  void SendResult(const ResultFrame& f) override {
    std::vector<std::byte> bytes(EncodedSize(f));
    Encode(f, bytes);
    asio::post(strand_, [self = shared_from_this(), b = std::move(bytes)]() mutable {
      self->Enqueue(std::move(b));
    });
  }

  void PostClose(std::string why) {
    asio::post(strand_, [self = shared_from_this(), why = std::move(why)] { self->Close(why); });
  }

 private:
  void OnStart() {
    handshake_timer_.expires_after(server_.options_.handshake_timeout);
    handshake_timer_.async_wait(
        asio::bind_executor(strand_, [self = shared_from_this()](error_code ec) {
          if (!ec && !self->hello_done_) self->Close("no HELLO within the handshake timeout");
        }));
    if (stream_.is_tls()) {
      stream_.tls().async_handshake(
          asio::ssl::stream_base::server,
          asio::bind_executor(strand_, [self = shared_from_this()](error_code ec) {
            if (ec) {
              self->Close(absl::StrCat("TLS handshake failed: ", ec.message()));
              return;
            }
            self->ReadHeader();
          }));
    } else {
      ReadHeader();
    }
  }

  void ReadHeader() {
    if (closed_) return;
    EnsureCapacity(kFrameHeaderBytes);
    stream_.AsyncRead(
        asio::buffer(buf_.get(), kFrameHeaderBytes),
        asio::bind_executor(
            strand_, [self = shared_from_this()](error_code ec, size_t) { self->OnHeader(ec); }));
  }

  void OnHeader(error_code ec) {
    if (ec) {
      Close(ec == asio::error::eof ? "peer closed the connection"
                                   : absl::StrCat("read failed: ", ec.message()));
      return;
    }
    if (closed_) return;
    std::span<const std::byte> in(buf_.get(), kFrameHeaderBytes);
    if (hello_done_ && !stream_.is_tls()) {
      absl::StatusOr<FrameHeader> h = DecodeFrameHeader(in, decoder_.max_frame_bytes());
      if (h.ok() && h->type == FrameType::kLayer && h->body_bytes >= kLayerFixedBytes) {
        ReadLayerFixed(h->body_bytes);
        return;
      }
    }
    RawFrame raw;
    absl::StatusOr<FrameDecoder::Result> r = decoder_.Next(in, &raw);
    if (!r.ok()) {
      FailConnection(TransferError::kMalformedFrame, std::string(r.status().message()));
      return;
    }
    if (*r == FrameDecoder::Result::kFrame) {  // empty body
      HandleFrame(raw);
      return;
    }
    const size_t need = decoder_.bytes_needed();
    EnsureCapacity(need);
    stream_.AsyncRead(
        asio::buffer(buf_.get() + kFrameHeaderBytes, need - kFrameHeaderBytes),
        asio::bind_executor(strand_, [self = shared_from_this(), need](error_code ec, size_t) {
          self->OnBody(ec, need);
        }));
  }

  void OnBody(error_code ec, size_t need) {
    if (ec) {
      Close(absl::StrCat("connection lost mid-frame: ", ec.message()));
      return;
    }
    std::span<const std::byte> in(buf_.get(), need);
    RawFrame raw;
    absl::StatusOr<FrameDecoder::Result> r = decoder_.Next(in, &raw);
    if (!r.ok() || *r != FrameDecoder::Result::kFrame) {  // cannot happen: header was validated
      Close("frame decoder lost sync");
      return;
    }
    HandleFrame(raw);
  }

  // ---- LAYER frames over plain TCP: fixed part, then the payload straight into place ----
  // The landing decides where the payload goes (KvLanding::BeginLayer): into the transfer's
  // reserved blocks (in place), into staging memory (dtype conversion), or nowhere (discard).
  // The payload is read with non-blocking reads issued here, on the strand, once the socket is
  // readable: each read is bracketed by AcquireLayerWrite/ReleaseLayerWrite (the blocks are held
  // only while the kernel copies into them, never while the peer is silent), and its bytes are
  // hashed as soon as they land, while still in cache. No frame buffer, no second copy.
  // (TLS connections read whole frames into buf_ instead: the SSL layer decrypts into its own
  // buffers and the copy out of them is not worth a second path.)
  void ReadLayerFixed(uint32_t body_bytes) {
    stream_.AsyncRead(asio::buffer(buf_.get() + kFrameHeaderBytes, kLayerFixedBytes),
                      asio::bind_executor(
                          strand_, [self = shared_from_this(), body_bytes](error_code ec, size_t) {
                            self->OnLayerFixed(ec, body_bytes);
                          }));
  }

  void OnLayerFixed(error_code ec, uint32_t body_bytes) {
    if (ec) {
      Close(absl::StrCat("connection lost mid-frame: ", ec.message()));
      return;
    }
    if (closed_) return;
    server_.landing_.BeginLayer(
        peer_, std::span<const std::byte>(buf_.get() + kFrameHeaderBytes, kLayerFixedBytes),
        body_bytes, &layer_);
    discard_left_ = 0;
    if (layer_.mode() == IncomingLayer::Mode::kDiscard) {
      discard_left_ = layer_.payload_bytes();
      server_.landing_.FinishLayer(&layer_);  // only resets it: nothing to deliver
    }
    ReadPayload();
  }

  // Reads what the socket has (up to the end of the frame), then waits for more.
  void ReadPayload() {
    tcp::socket& socket = stream_.socket();
    for (size_t turn = 0;;) {
      if (turn >= kPayloadBytesPerTurn) {
        asio::post(strand_, [self = shared_from_this()] { self->OnPayloadReadable({}); });
        return;
      }
      if (discard_left_ == 0 && layer_.complete()) {
        // Verifies and commits (or ends the transfer); only resets `layer_` after a discard.
        server_.landing_.FinishLayer(&layer_);
        ReadHeader();
        return;
      }
      error_code ec;
      size_t got = 0;
      if (discard_left_ > 0) {
        got =
            socket.read_some(asio::buffer(buf_.get(), std::min<uint64_t>(discard_left_, cap_)), ec);
        discard_left_ -= got;
      } else if (!server_.landing_.AcquireLayerWrite(&layer_)) {
        // The transfer ended mid-payload (cancel, deadline): drop the rest of the frame.
        discard_left_ = layer_.payload_bytes() - layer_.received_bytes();
        server_.landing_.AbandonLayer(&layer_, TransferError::kCancelledByReceiver,
                                      "transfer ended mid-payload");
        continue;
      } else {
        const size_t n = layer_.NextBuffers(spans_, kMaxPayloadReadBytes);
        for (size_t i = 0; i < n; ++i) {
          iov_[i] = asio::mutable_buffer(spans_[i].data(), spans_[i].size());
        }
        got = socket.read_some(std::span<const asio::mutable_buffer>(iov_.data(), n), ec);
        layer_.Received(got);
        server_.landing_.ReleaseLayerWrite(&layer_);
      }
      turn += got;
      if (ec == asio::error::would_block || ec == asio::error::try_again) {
        socket.async_wait(tcp::socket::wait_read,
                          asio::bind_executor(strand_, [self = shared_from_this()](error_code e) {
                            self->OnPayloadReadable(e);
                          }));
        return;
      }
      if (ec) {
        Close(ec == asio::error::eof ? "peer closed the connection mid-frame"
                                     : absl::StrCat("connection lost mid-frame: ", ec.message()));
        return;
      }
    }
  }

  void OnPayloadReadable(error_code ec) {
    if (closed_) return;
    if (ec) {
      Close(absl::StrCat("connection lost mid-frame: ", ec.message()));
      return;
    }
    ReadPayload();
  }

  void HandleFrame(const RawFrame& raw) {
    if (!hello_done_) {
      absl::Status s;
      if (raw.type != FrameType::kHello) {
        s = TransferStatus(TransferError::kProtocolViolation, "first frame is not HELLO");
      } else if (absl::StatusOr<Frame> f = DecodeFrameBody(raw.type, raw.body); !f.ok()) {
        s = TransferStatus(TransferError::kMalformedFrame, std::string(f.status().message()));
      } else {
        s = server_.landing_.AcceptHello(peer_, std::get<HelloFrame>(*f));
      }
      if (!s.ok()) {
        FailConnection(TransferError::kAuthFailed, std::string(s.message()));
        return;
      }
      hello_done_ = true;
      handshake_timer_.cancel();
      const HelloFrame hello = server_.landing_.LocalHello();
      std::vector<std::byte> bytes(EncodedSize(hello));
      Encode(hello, bytes);
      Enqueue(std::move(bytes));
    } else if (absl::Status s = server_.landing_.OnFrame(peer_, raw.type, raw.body); !s.ok()) {
      FailConnection(TransferError::kProtocolViolation, std::string(s.message()));
      return;
    }
    ReadHeader();
  }

  // Tells the peer why (RESULT for transfer 0), then closes once that is written; the
  // connection's transfers end with `reason`.
  void FailConnection(TransferError reason, std::string why) {
    close_error_ = reason;
    ResultFrame f;
    f.transfer_id = 0;
    f.reason = reason;
    f.code = TransferErrorCode(reason);
    f.text = why;
    std::vector<std::byte> bytes(EncodedSize(f));
    Encode(f, bytes);
    close_reason_ = std::move(why);
    closing_ = true;
    Enqueue(std::move(bytes));
  }

  void Enqueue(std::vector<std::byte> bytes) {
    if (closed_) return;
    if (out_.size() >= kMaxQueuedResults) {
      // A sender that provokes answers but does not read them gets no unbounded queue.
      Close("sender is not reading its RESULTs");
      return;
    }
    out_.push_back(std::move(bytes));
    if (!writing_) WriteNext();
  }

  void WriteNext() {
    writing_ = true;
    const uint64_t gen = ++write_gen_;
    write_timer_.expires_after(server_.options_.write_timeout);
    write_timer_.async_wait(
        asio::bind_executor(strand_, [self = shared_from_this(), gen](error_code ec) {
          if (!ec && self->writing_ && self->write_gen_ == gen) {
            self->Close("peer stopped reading (write timeout)");
          }
        }));
    stream_.AsyncWrite(
        asio::buffer(out_.front()),
        asio::bind_executor(
            strand_, [self = shared_from_this()](error_code ec, size_t) { self->OnWrite(ec); }));
  }

  void OnWrite(error_code ec) {
    writing_ = false;
    write_timer_.cancel();
    if (ec) {
      Close(absl::StrCat("write failed: ", ec.message()));
      return;
    }
    out_.pop_front();
    if (!out_.empty()) {
      WriteNext();
    } else if (closing_) {
      Close(close_reason_);
    }
  }

  void Close(const std::string& why) {
    if (closed_) return;
    closed_ = true;
    stream_.Close();
    handshake_timer_.cancel();
    write_timer_.cancel();
    --server_.live_connections_;
    // A LAYER payload in progress ends its transfer. No read is writing into it: payload reads
    // are synchronous, on this strand.
    server_.landing_.AbandonLayer(&layer_, close_error_, why);
    // Ends the transfers bound to this connection and drops the landing's reference to us.
    server_.landing_.DetachPeer(peer_, why, close_error_);
  }

  void EnsureCapacity(size_t n) {
    if (n <= cap_) return;
    size_t cap = std::max<size_t>(cap_ * 2, 64 << 10);
    while (cap < n) cap *= 2;
    // Plain new[]: 16-byte aligned, so K/V payloads (at offset 56) are 8-byte aligned.
    std::unique_ptr<std::byte[]> next(new std::byte[cap]);
    if (buf_) std::memcpy(next.get(), buf_.get(), kFrameHeaderBytes);
    buf_ = std::move(next);
    cap_ = cap;
  }

  KvServer::Impl& server_;
  asio::strand<asio::io_context::executor_type> strand_;
  internal::KvStream stream_;
  FrameDecoder decoder_;
  asio::steady_timer handshake_timer_;
  asio::steady_timer write_timer_;
  std::unique_ptr<std::byte[]> buf_;
  size_t cap_ = 0;
  IncomingLayer layer_;
  std::array<std::span<std::byte>, kMaxReadSpans> spans_;
  std::array<asio::mutable_buffer, kMaxReadSpans> iov_;
  uint64_t discard_left_ = 0;  // payload bytes of the current LAYER to read and drop
  PeerId peer_ = 0;
  bool hello_done_ = false;
  bool closed_ = false;
  bool closing_ = false;
  std::string close_reason_;
  TransferError close_error_ = TransferError::kPeerDisconnected;
  bool writing_ = false;
  uint64_t write_gen_ = 0;
  std::deque<std::vector<std::byte>> out_;
};

}  // namespace

absl::Status KvServer::Impl::Init() {
  if (options_.tls.enabled) {
    auto ctx = internal::MakeServerTlsContext(options_.tls);
    if (!ctx.ok()) return ctx.status();
    tls_ = std::move(*ctx);
  }
  error_code ec;
  const asio::ip::address addr = asio::ip::make_address(options_.bind_address, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad KV bind address '", options_.bind_address, "': ", ec.message()));
  }
  const tcp::endpoint ep(addr, options_.port);
  acceptor_.open(ep.protocol(), ec);
  if (!ec) acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) acceptor_.bind(ep, ec);
  if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options_.bind_address, ":",
                                               options_.port, ": ", ec.message()));
  }
  bound_ = acceptor_.local_endpoint();
  Accept();
  Reap();
  for (int i = 0; i < std::max(1, options_.io_threads); ++i) {
    threads_.emplace_back([this] { io_.run(); });
  }
  return absl::OkStatus();
}

void KvServer::Impl::Accept() {
  acceptor_.async_accept(io_, [this](error_code ec, tcp::socket socket) {
    if (ec || stopped_) {
      return;  // acceptor closed
    }
    auto conn = std::make_shared<ServerConnection>(*this, std::move(socket));
    {
      absl::MutexLock lock(&mu_);
      std::erase_if(connections_, [](const auto& w) { return w.expired(); });
      connections_.push_back(conn);
    }
    conn->Start();
    Accept();
  });
}

void KvServer::Impl::Reap() {
  reap_timer_.expires_after(options_.reap_interval);
  reap_timer_.async_wait([this](error_code ec) {
    if (ec || stopped_) return;
    landing_.ReapExpired(KvClock::now());
    Reap();
  });
}

void KvServer::Impl::Stop() {
  if (stopped_.exchange(true)) return;
  asio::post(io_, [this] {
    error_code ignored;
    acceptor_.close(ignored);
    reap_timer_.cancel();
    absl::MutexLock lock(&mu_);
    for (auto& w : connections_) {
      if (auto c = w.lock()) c->PostClose("receiver shutting down");
    }
  });
  work_.reset();
  for (auto& t : threads_) t.join();
  threads_.clear();
  absl::MutexLock lock(&mu_);
  connections_.clear();
}

absl::StatusOr<std::unique_ptr<KvServer>> KvServer::Start(KvLanding& landing,
                                                          KvServerOptions options) {
  auto impl = std::make_unique<Impl>(landing, std::move(options));
  if (absl::Status s = impl->Init(); !s.ok()) {
    return s;
  }
  return std::unique_ptr<KvServer>(new KvServer(std::move(impl)));
}

KvServer::KvServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
KvServer::~KvServer() { Stop(); }
void KvServer::Stop() { impl_->Stop(); }
uint16_t KvServer::port() const { return impl_->bound_.port(); }
std::string KvServer::address() const {
  return absl::StrCat(impl_->bound_.address().to_string(), ":", impl_->bound_.port());
}
size_t KvServer::connection_count() const { return impl_->live_connections_.load(); }

}  // namespace tandem
