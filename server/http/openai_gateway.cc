// The HTTP/1.1 server of the OpenAI gateway and its gRPC callback calls to the router.
//
// Threading: one io_context thread; each connection's socket and timer live on their own strand.
// gRPC callbacks (reactor reactions, unary completions) never touch connection state: they post
// to the connection's strand. A Generate reactor holds its connection alive until OnDone has
// been handled on that strand; only then is it deleted, so the strand may call Cancel() on it
// at any time before that.
#include "server/http/openai_gateway.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <array>
#include <boost/asio.hpp>
#include <cctype>
#include <cstdio>
#include <ctime>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "server/http/openai_protocol.h"
#include "tandem/v1/tandem.grpc.pb.h"

namespace tandem {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using http::ApiError;

// Pause reading the router's stream while this much response is waiting for a slow client.
constexpr size_t kOutboxHighWater = 256 << 10;
constexpr auto kUnaryDeadline = std::chrono::seconds(5);

const char* Reason(int status) {
  switch (status) {
    case 200:
      return "OK";
    case 400:
      return "Bad Request";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 408:
      return "Request Timeout";
    case 411:
      return "Length Required";
    case 413:
      return "Payload Too Large";
    case 429:
      return "Too Many Requests";
    case 431:
      return "Request Header Fields Too Large";
    case 500:
      return "Internal Server Error";
    case 501:
      return "Not Implemented";
    case 503:
      return "Service Unavailable";
    case 504:
      return "Gateway Timeout";
    default:
      return "Error";
  }
}

std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

std::string Trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t") - b + 1);
}

struct HttpRequest {
  std::string method;
  std::string path;  // without the query
  bool http11 = true;
  bool keep_alive = true;
  std::string body;
};

std::string Chunk(std::string_view data) {
  char size[20];
  std::snprintf(size, sizeof(size), "%zx\r\n", data.size());
  std::string out = size;
  out.append(data);
  out += "\r\n";
  return out;
}

class Connection;

}  // namespace

class OpenAiGateway::Core {
 public:
  explicit Core(OpenAiGatewayOptions o)
      : options_(std::move(o)),
        channel_(grpc::CreateChannel(options_.router_address, grpc::InsecureChannelCredentials())),
        stub_(v1::Tandem::NewStub(channel_)),
        acceptor_(io_) {}

  absl::Status Listen();
  void StopAccepting() {
    asio::post(io_, [this] {
      boost::system::error_code ignored;
      acceptor_.close(ignored);
    });
  }
  void Stop();

  const OpenAiGatewayOptions& options() const { return options_; }
  v1::Tandem::Stub& stub() { return *stub_; }
  int port() const { return port_; }

  // Every outstanding gRPC call is counted, so that Stop() can wait for their OnDone.
  void CallStarted() {
    absl::MutexLock l(&mu_);
    ++calls_;
  }
  void CallFinished() {
    absl::MutexLock l(&mu_);
    --calls_;
  }
  void Register(Connection* c, std::weak_ptr<Connection> w) {
    absl::MutexLock l(&mu_);
    connections_[c] = std::move(w);
  }
  void Unregister(Connection* c) {
    absl::MutexLock l(&mu_);
    connections_.erase(c);
  }

  // Calls `done` (on a gRPC thread) with the served models, from the cache once known.
  void ListModels(bool use_cache,
                  std::function<void(const grpc::Status&, const v1::ListModelsResponse&)> done);

 private:
  void Accept();

  // Declared first: connections unregister in their destructors, which may run while io_'s
  // pending handlers are destroyed.
  absl::Mutex mu_;
  int calls_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<Connection*, std::weak_ptr<Connection>> connections_ ABSL_GUARDED_BY(mu_);
  std::optional<v1::ListModelsResponse> models_ ABSL_GUARDED_BY(mu_);
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;

  OpenAiGatewayOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Tandem::Stub> stub_;
  asio::io_context io_;
  tcp::acceptor acceptor_;
  std::thread thread_;
  int port_ = 0;
};

namespace {

class GenerateCall;

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(OpenAiGateway::Core& core, tcp::socket socket)
      : core_(core), socket_(std::move(socket)), timer_(socket_.get_executor()) {}
  ~Connection() { core_.Unregister(this); }

  asio::any_io_executor executor() { return socket_.get_executor(); }

  void Start() {
    asio::post(executor(), [self = shared_from_this()] {
      self->BeginRequest();
      self->ReadMore();
    });
  }

  // Strand only. Cancels the call in flight (if any) and closes the socket.
  void Close();

  // From the Generate reactor, on the strand.
  void OnGenerateMessage(bool ok, const v1::GenerateResponse& msg);
  void OnGenerateDone(const grpc::Status& status);

 private:
  // kLingering: the last response is out and our side is shut down; the client's remaining
  // bytes are read and dropped until it closes (or briefly), so that closing with unread data
  // does not reset the connection before the client has read the response.
  enum class State { kReading, kProcessing, kLingering, kClosed };

  void BeginRequest();
  void ReadMore();
  void OnRead(const boost::system::error_code& ec, size_t n);
  void TryParse();
  void Dispatch(HttpRequest req);
  void StartCompletion(http::CompletionRequest req, std::string served_model);

  // Queues a complete response; the request is over once it is written.
  void Respond(int status, std::string_view content_type, std::string_view body,
               std::string_view extra_headers = "");
  void RespondError(const ApiError& e, std::string_view extra_headers = "");
  // Queues a response and closes the connection after it (framing errors).
  void RespondAndClose(const ApiError& e) {
    state_ = State::kProcessing;
    ++timer_generation_;
    timer_.cancel();
    close_after_ = true;
    RespondError(e);
  }
  void Linger();
  void Write(std::string data);
  void DoWrite();
  void OnWritten(const boost::system::error_code& ec);
  void EndOfStream();

  OpenAiGateway::Core& core_;
  tcp::socket socket_;
  asio::steady_timer timer_;
  State state_ = State::kReading;
  uint64_t timer_generation_ = 0;
  std::string in_;
  std::array<char, 8192> scratch_;
  bool reading_ = false;
  bool peer_gone_ = false;
  bool keep_alive_ = true;
  bool http11_ = true;
  bool close_after_ = false;    // close once the outbox is written
  bool response_done_ = false;  // the request is over once the outbox is written
  std::deque<std::string> outbox_;
  size_t outbox_bytes_ = 0;
  bool writing_ = false;

  // The completion in flight.
  GenerateCall* call_ = nullptr;
  bool call_paused_ = false;
  http::CompletionRequest completion_;
  http::CompletionIdentity identity_;
  http::CompletionPiece accumulated_;
  v1::Usage usage_;
  bool stream_started_ = false;
  bool role_sent_ = false;  // chat streams: the first chunk carries the assistant role
};

// One Generate call on the callback API. Created and started on the connection's strand.
class GenerateCall final : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  GenerateCall(OpenAiGateway::Core& core, std::shared_ptr<Connection> conn)
      : core_(core), conn_(std::move(conn)) {}

  void Start(const v1::GenerateRequest& request) {
    request_ = request;
    core_.CallStarted();
    core_.stub().async()->Generate(&context_, &request_, this);
    // Reads are also started from the strand (outside reactions): the hold keeps OnDone from
    // running before the last of them has been started or the stream abandoned.
    AddHold();
    reading_ = true;
    StartRead(&response_);
    StartCall();
  }
  // Strand only.
  void ReadNext() {
    response_.Clear();
    reading_ = true;
    StartRead(&response_);
  }
  // Strand only. Idempotent.
  void ReleaseHold() {
    if (holding_) {
      holding_ = false;
      RemoveHold();
    }
  }
  // Strand only: the router frees the request (and its KV blocks).
  void Cancel() {
    context_.TryCancel();
    if (!reading_) ReleaseHold();
  }

  void OnReadDone(bool ok) override {
    auto msg = std::make_shared<v1::GenerateResponse>(std::move(response_));
    asio::post(conn_->executor(), [this, ok, msg] {
      reading_ = false;
      conn_->OnGenerateMessage(ok, *msg);
    });
  }
  void OnDone(const grpc::Status& s) override {
    asio::post(conn_->executor(), [this, s] {
      conn_->OnGenerateDone(s);
      core_.CallFinished();
      delete this;
    });
  }

 private:
  OpenAiGateway::Core& core_;
  std::shared_ptr<Connection> conn_;
  grpc::ClientContext context_;
  v1::GenerateRequest request_;
  v1::GenerateResponse response_;
  bool reading_ = false;  // strand
  bool holding_ = true;   // strand
};

void Connection::Close() {
  if (state_ == State::kClosed) return;
  state_ = State::kClosed;
  if (call_ != nullptr) call_->Cancel();
  ++timer_generation_;
  timer_.cancel();
  boost::system::error_code ignored;
  socket_.shutdown(tcp::socket::shutdown_both, ignored);
  socket_.close(ignored);
}

void Connection::Linger() {
  state_ = State::kLingering;
  in_.clear();
  boost::system::error_code ignored;
  socket_.shutdown(tcp::socket::shutdown_send, ignored);
  const uint64_t gen = ++timer_generation_;
  timer_.expires_after(std::chrono::seconds(2));
  timer_.async_wait([self = shared_from_this(), gen](const boost::system::error_code& ec) {
    if (!ec && gen == self->timer_generation_) self->Close();
  });
  ReadMore();
}

void Connection::BeginRequest() {
  state_ = State::kReading;
  const uint64_t gen = ++timer_generation_;
  timer_.expires_after(core_.options().read_timeout);
  timer_.async_wait([self = shared_from_this(), gen](const boost::system::error_code& ec) {
    if (ec || gen != self->timer_generation_ || self->state_ != State::kReading) return;
    if (self->in_.empty()) {
      self->Close();  // an idle keep-alive connection
    } else {
      ApiError e;
      e.status = 408;
      e.message = "the request did not arrive in time";
      self->RespondAndClose(e);
    }
  });
}

void Connection::ReadMore() {
  const size_t cap = core_.options().max_header_bytes + core_.options().max_body_bytes;
  if (reading_ || state_ == State::kClosed || peer_gone_ || in_.size() > cap) return;
  reading_ = true;
  socket_.async_read_some(asio::buffer(scratch_),
                          [self = shared_from_this()](const boost::system::error_code& ec,
                                                      size_t n) { self->OnRead(ec, n); });
}

void Connection::OnRead(const boost::system::error_code& ec, size_t n) {
  reading_ = false;
  if (state_ == State::kClosed) return;
  if (state_ == State::kLingering) {
    if (ec) {
      Close();
    } else {
      ReadMore();
    }
    return;
  }
  if (ec) {
    // The client went away (or half-closed): whatever is in flight is abandoned.
    peer_gone_ = true;
    Close();
    return;
  }
  in_.append(scratch_.data(), n);
  if (state_ == State::kReading && !writing_ && outbox_.empty()) TryParse();
  ReadMore();
}

void Connection::TryParse() {
  const OpenAiGatewayOptions& o = core_.options();
  const size_t end = in_.find("\r\n\r\n");
  // Headers so far: all that arrived while the blank line is missing.
  const size_t header_bytes = end == std::string::npos ? in_.size() : end + 4;
  if (header_bytes > o.max_header_bytes) {
    ApiError e;
    e.status = 431;
    e.message = "the request headers exceed " + std::to_string(o.max_header_bytes) + " bytes";
    RespondAndClose(e);
    return;
  }
  if (end == std::string::npos) {
    return;
  }
  const size_t header_end = end + 4;
  ApiError bad;
  bad.message = "malformed HTTP request";
  HttpRequest req;
  size_t line_end = in_.find("\r\n");
  {
    const std::string line = in_.substr(0, line_end);
    const size_t sp1 = line.find(' ');
    const size_t sp2 = line.rfind(' ');
    if (sp1 == std::string::npos || sp2 == sp1) {
      RespondAndClose(bad);
      return;
    }
    req.method = line.substr(0, sp1);
    std::string target = line.substr(sp1 + 1, sp2 - sp1 - 1);
    const std::string version = line.substr(sp2 + 1);
    if (version == "HTTP/1.0") {
      req.http11 = false;
      req.keep_alive = false;
    } else if (version != "HTTP/1.1") {
      RespondAndClose(bad);
      return;
    }
    req.path = target.substr(0, target.find('?'));
  }
  size_t content_length = 0;
  size_t pos = line_end + 2;
  while (pos < end + 2) {
    const size_t eol = in_.find("\r\n", pos);
    const std::string line = in_.substr(pos, eol - pos);
    pos = eol + 2;
    const size_t colon = line.find(':');
    if (colon == std::string::npos || colon == 0) {
      RespondAndClose(bad);
      return;
    }
    const std::string name = Lower(line.substr(0, colon));
    const std::string value = Trim(line.substr(colon + 1));
    if (name == "content-length") {
      if (value.empty() || value.size() > 18 ||
          !std::all_of(value.begin(), value.end(), [](char c) { return c >= '0' && c <= '9'; })) {
        RespondAndClose(bad);
        return;
      }
      content_length = std::stoull(value);
    } else if (name == "transfer-encoding") {
      ApiError e;
      e.status = 411;
      e.message = "request bodies need a Content-Length (chunked uploads are not supported)";
      RespondAndClose(e);
      return;
    } else if (name == "connection") {
      const std::string v = Lower(value);
      if (v.find("close") != std::string::npos) req.keep_alive = false;
      if (v.find("keep-alive") != std::string::npos && !req.http11) req.keep_alive = true;
    }
  }
  if (content_length > o.max_body_bytes) {
    ApiError e;
    e.status = 413;
    e.message = "the request body exceeds " + std::to_string(o.max_body_bytes) + " bytes";
    RespondAndClose(e);
    return;
  }
  if (in_.size() < header_end + content_length) {
    ReadMore();
    return;
  }
  req.body = in_.substr(header_end, content_length);
  in_.erase(0, header_end + content_length);
  state_ = State::kProcessing;
  ++timer_generation_;
  timer_.cancel();
  keep_alive_ = req.keep_alive;
  http11_ = req.http11;
  Dispatch(std::move(req));
}

void Connection::Dispatch(HttpRequest req) {
  auto method_not_allowed = [&](const char* allow) {
    ApiError e;
    e.status = 405;
    e.message = "method " + req.method + " is not allowed on " + req.path + "; use " + allow;
    RespondError(e, std::string("Allow: ") + allow + "\r\n");
  };
  if (req.path == "/v1/completions" || req.path == "/v1/chat/completions") {
    if (req.method != "POST") return method_not_allowed("POST");
    http::CompletionRequest c;
    if (req.path == "/v1/completions") {
      if (auto e = http::ParseCompletionRequest(req.body, &c)) return RespondError(*e);
    } else {
      const OpenAiGatewayOptions& o = core_.options();
      http::ChatRenderer chat;
      chat.chat_template = o.chat_template.get();
      chat.unavailable = o.chat_unavailable;
      chat.bos_token = o.bos_token;
      chat.eos_token = o.eos_token;
      if (auto e = http::ParseChatRequest(req.body, chat, &c)) return RespondError(*e);
    }
    completion_ = std::move(c);
    core_.ListModels(
        true, [self = shared_from_this()](const grpc::Status& s, const v1::ListModelsResponse& m) {
          asio::post(self->executor(), [self, s, m] {
            if (self->state_ == State::kClosed) return;
            if (!s.ok()) return self->RespondError(http::FromGrpcError(s));
            const std::string served = m.models_size() > 0 ? m.models(0).id() : "";
            if (!self->completion_.model.empty() && self->completion_.model != served) {
              ApiError e;
              e.status = 404;
              e.param = "model";
              e.code = "model_not_found";
              e.message = "the model '" + self->completion_.model +
                          "' does not exist; this server serves '" + served + "'";
              return self->RespondError(e);
            }
            self->StartCompletion(std::move(self->completion_), served);
          });
        });
    return;
  }
  if (req.path == "/v1/models") {
    if (req.method != "GET") return method_not_allowed("GET");
    core_.ListModels(
        false, [self = shared_from_this()](const grpc::Status& s, const v1::ListModelsResponse& m) {
          asio::post(self->executor(), [self, s, m] {
            if (self->state_ == State::kClosed) return;
            if (!s.ok()) return self->RespondError(http::FromGrpcError(s));
            self->Respond(200, "application/json", http::ModelsJson(m, std::time(nullptr)));
          });
        });
    return;
  }
  if (req.path == "/health") {
    if (req.method != "GET") return method_not_allowed("GET");
    core_.ListModels(
        false, [self = shared_from_this()](const grpc::Status& s, const v1::ListModelsResponse&) {
          asio::post(self->executor(), [self, s] {
            if (self->state_ == State::kClosed) return;
            if (s.ok()) {
              self->Respond(200, "text/plain", "ok\n");
            } else {
              self->Respond(503, "text/plain", "unavailable: " + s.error_message() + "\n");
            }
          });
        });
    return;
  }
  ApiError e;
  e.status = 404;
  e.type = "not_found_error";
  e.message = "no route for " + req.method + " " + req.path;
  RespondError(e);
}

void Connection::StartCompletion(http::CompletionRequest req, std::string served_model) {
  completion_ = std::move(req);
  identity_ = {http::NewCompletionId(completion_.chat), static_cast<int64_t>(std::time(nullptr)),
               std::move(served_model), completion_.chat};
  accumulated_ = {};
  usage_.Clear();
  stream_started_ = false;
  role_sent_ = false;
  call_paused_ = false;
  call_ = new GenerateCall(core_, shared_from_this());
  call_->Start(completion_.generate);
}

void Connection::OnGenerateMessage(bool ok, const v1::GenerateResponse& msg) {
  if (!ok || state_ == State::kClosed) {
    call_->ReleaseHold();
    return;
  }
  if (msg.has_usage()) usage_ = msg.usage();
  if (completion_.stream) {
    http::CompletionPiece piece;
    piece.Append(msg);
    if (!stream_started_) {
      stream_started_ = true;
      std::string head =
          "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
          "Cache-Control: no-cache\r\n";
      head += http11_ ? "Transfer-Encoding: chunked\r\n" : "Connection: close\r\n";
      if (!http11_) keep_alive_ = false;
      if (!keep_alive_) close_after_ = true;
      if (!keep_alive_ && http11_) head += "Connection: close\r\n";
      Write(head + "\r\n");
    }
    if (!piece.text.empty() || !piece.finish_reason.empty() ||
        (completion_.logprobs && !piece.token_ids.empty()) ||
        (completion_.chat && !role_sent_)) {
      const std::string json =
          completion_.chat
              ? http::ChatChunkJson(identity_, piece, completion_.logprobs, !role_sent_)
              : http::CompletionJson(identity_, piece, completion_.logprobs, nullptr);
      role_sent_ = true;
      const std::string event = "data: " + json + "\n\n";
      Write(http11_ ? Chunk(event) : event);
    }
  } else {
    accumulated_.Append(msg);
  }
  if (outbox_bytes_ < kOutboxHighWater) {
    call_->ReadNext();
  } else {
    call_paused_ = true;
  }
}

void Connection::EndOfStream() {
  if (http11_) Write("0\r\n\r\n");
  response_done_ = true;
  if (!writing_ && outbox_.empty()) OnWritten({});
}

void Connection::OnGenerateDone(const grpc::Status& status) {
  call_ = nullptr;
  call_paused_ = false;
  if (state_ == State::kClosed) return;
  if (completion_.stream && stream_started_) {
    if (status.ok()) {
      if (completion_.include_usage) {
        const std::string event = "data: " + http::UsageChunkJson(identity_, usage_) + "\n\n";
        Write(http11_ ? Chunk(event) : event);
      }
      const std::string done = "data: [DONE]\n\n";
      Write(http11_ ? Chunk(done) : done);
    } else {
      // The status line has gone out: the error becomes the last event.
      const std::string event = "data: " + http::ErrorJson(http::FromGrpcError(status)) + "\n\n";
      Write(http11_ ? Chunk(event) : event);
      close_after_ = true;
    }
    EndOfStream();
    return;
  }
  if (!status.ok()) return RespondError(http::FromGrpcError(status));
  if (completion_.stream) {
    // Finished without a single message (cannot happen with today's router): an empty stream.
    std::string body;
    if (completion_.include_usage)
      body += "data: " + http::UsageChunkJson(identity_, usage_) + "\n\n";
    body += "data: [DONE]\n\n";
    return Respond(200, "text/event-stream", body);
  }
  Respond(200, "application/json",
          http::CompletionJson(identity_, accumulated_, completion_.logprobs, &usage_));
}

void Connection::Respond(int status, std::string_view content_type, std::string_view body,
                         std::string_view extra_headers) {
  if (state_ == State::kClosed) return;
  if (!keep_alive_) close_after_ = true;
  std::string out = "HTTP/1.1 " + std::to_string(status) + " " + Reason(status) + "\r\n";
  out += "Content-Type: ";
  out.append(content_type);
  out += "\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
  out.append(extra_headers);
  if (close_after_) {
    out += "Connection: close\r\n";
  } else if (!http11_) {
    out += "Connection: keep-alive\r\n";
  }
  out += "\r\n";
  out.append(body);
  Write(std::move(out));
  response_done_ = true;
}

void Connection::RespondError(const ApiError& e, std::string_view extra_headers) {
  Respond(e.status, "application/json", http::ErrorJson(e), extra_headers);
}

void Connection::Write(std::string data) {
  if (state_ == State::kClosed) return;
  outbox_bytes_ += data.size();
  outbox_.push_back(std::move(data));
  if (!writing_) DoWrite();
}

void Connection::DoWrite() {
  writing_ = true;
  asio::async_write(socket_, asio::buffer(outbox_.front()),
                    [self = shared_from_this()](const boost::system::error_code& ec, size_t) {
                      self->OnWritten(ec);
                    });
}

void Connection::OnWritten(const boost::system::error_code& ec) {
  if (writing_) {
    writing_ = false;
    if (!outbox_.empty()) {
      outbox_bytes_ -= outbox_.front().size();
      outbox_.pop_front();
    }
  }
  if (state_ == State::kClosed) return;
  if (ec) {
    peer_gone_ = true;
    Close();  // cancels the call in flight
    return;
  }
  if (!outbox_.empty()) {
    DoWrite();
  }
  if (call_ != nullptr && call_paused_ && outbox_bytes_ < kOutboxHighWater) {
    call_paused_ = false;
    call_->ReadNext();
  }
  if (!outbox_.empty() || !response_done_) return;
  // The response is out.
  response_done_ = false;
  if (peer_gone_) {
    Close();
    return;
  }
  if (close_after_) {
    Linger();
    return;
  }
  BeginRequest();
  TryParse();
  ReadMore();
}

}  // namespace

absl::Status OpenAiGateway::Core::Listen() {
  boost::system::error_code ec;
  const auto addr = asio::ip::make_address(options_.bind_address, ec);
  if (ec) {
    return absl::InvalidArgumentError("--bind address '" + options_.bind_address +
                                      "': " + ec.message());
  }
  const tcp::endpoint ep(addr, static_cast<uint16_t>(options_.port));
  acceptor_.open(ep.protocol(), ec);
  if (!ec) acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acceptor_.bind(ep, ec);
  if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return absl::UnavailableError("cannot serve HTTP on " + options_.bind_address + ":" +
                                  std::to_string(options_.port) + ": " + ec.message());
  }
  port_ = acceptor_.local_endpoint().port();
  Accept();
  thread_ = std::thread([this] { io_.run(); });
  return absl::OkStatus();
}

void OpenAiGateway::Core::Accept() {
  acceptor_.async_accept(asio::make_strand(io_),
                         [this](const boost::system::error_code& ec, tcp::socket s) {
                           if (ec == asio::error::operation_aborted || !acceptor_.is_open()) return;
                           if (!ec) {
                             boost::system::error_code ignored;
                             s.set_option(tcp::no_delay(true), ignored);
                             auto c = std::make_shared<Connection>(*this, std::move(s));
                             Register(c.get(), c);
                             c->Start();
                           }
                           Accept();
                         });
}

void OpenAiGateway::Core::ListModels(
    bool use_cache, std::function<void(const grpc::Status&, const v1::ListModelsResponse&)> done) {
  if (use_cache) {
    std::optional<v1::ListModelsResponse> cached;
    {
      absl::MutexLock l(&mu_);
      cached = models_;
    }
    if (cached) {
      done(grpc::Status::OK, *cached);
      return;
    }
  }
  struct Unary {
    grpc::ClientContext context;
    v1::ListModelsRequest request;
    v1::ListModelsResponse response;
  };
  auto u = std::make_shared<Unary>();
  u->context.set_deadline(std::chrono::system_clock::now() + kUnaryDeadline);
  CallStarted();
  stub_->async()->ListModels(&u->context, &u->request, &u->response,
                             [this, u, done = std::move(done)](grpc::Status s) {
                               if (s.ok()) {
                                 absl::MutexLock l(&mu_);
                                 models_ = u->response;
                               }
                               done(s, u->response);
                               CallFinished();
                             });
}

void OpenAiGateway::Core::Stop() {
  {
    absl::MutexLock l(&mu_);
    if (stopped_) return;
    stopped_ = true;
  }
  // On the I/O thread, after the acceptor is closed, so that no connection is accepted after
  // the snapshot.
  asio::post(io_, [this] {
    boost::system::error_code ignored;
    acceptor_.close(ignored);
    std::vector<std::shared_ptr<Connection>> live;
    {
      absl::MutexLock l(&mu_);
      for (auto& [raw, weak] : connections_) {
        if (auto c = weak.lock()) live.push_back(std::move(c));
      }
    }
    for (auto& c : live) {
      asio::post(c->executor(), [c] { c->Close(); });
    }
  });
  // Cancelled calls end promptly; their OnDone runs on the I/O thread, still running here.
  {
    absl::MutexLock l(&mu_);
    auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return calls_ == 0; };
    mu_.AwaitWithTimeout(absl::Condition(&idle), absl::Seconds(10));
  }
  io_.stop();
  if (thread_.joinable()) thread_.join();
}

OpenAiGateway::OpenAiGateway(std::unique_ptr<Core> core) : core_(std::move(core)) {}

OpenAiGateway::~OpenAiGateway() { Stop(); }

absl::StatusOr<std::unique_ptr<OpenAiGateway>> OpenAiGateway::Start(OpenAiGatewayOptions o) {
  if (o.port < 0 || o.port > 65535) {
    return absl::InvalidArgumentError("--http-port must be in [0, 65535] (or -1: off)");
  }
  if (o.router_address.empty()) {
    return absl::InvalidArgumentError("the HTTP gateway needs the router's gRPC address");
  }
  auto core = std::make_unique<Core>(std::move(o));
  if (absl::Status s = core->Listen(); !s.ok()) {
    return s;
  }
  return std::unique_ptr<OpenAiGateway>(new OpenAiGateway(std::move(core)));
}

void OpenAiGateway::StopAccepting() { core_->StopAccepting(); }
void OpenAiGateway::Stop() { core_->Stop(); }
int OpenAiGateway::port() const { return core_->port(); }

std::string OpenAiGateway::address() const {
  const std::string& host = core_->options().bind_address;
  return (host == "0.0.0.0" || host.empty() ? "127.0.0.1" : host) + ":" +
         std::to_string(core_->port());
}

}  // namespace tandem
