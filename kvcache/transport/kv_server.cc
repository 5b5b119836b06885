// KV receiver over Boost.Asio: accept loop, per-connection framed reads into a reusable buffer,
// RESULT writes with a timeout, and a periodic deadline reaper.
#include "kvcache/transport/kv_server.h"

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
    std::span<const std::byte> in(buf_.get(), kFrameHeaderBytes);
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
