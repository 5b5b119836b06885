// An OpenAI-compatible HTTP/1.1 gateway (/v1/completions, /v1/chat/completions, /v1/models,
// /health) in front of a
// router's public gRPC API. Contract: docs/api.md, "OpenAI-compatible HTTP".
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/chat_template.h"

namespace tandem {

struct OpenAiGatewayOptions {
  std::string bind_address = "127.0.0.1";
  int port = 0;                        // 0: pick a free port
  std::string router_address;          // the router's gRPC target, e.g. "127.0.0.1:50051"
  size_t max_header_bytes = 16 << 10;  // request line + headers; beyond: 431
  size_t max_body_bytes = 4 << 20;     // Content-Length beyond this: 413
  // A request (or an idle keep-alive connection) must arrive within this; else the connection
  // is closed (408 when part of a request had arrived).
  std::chrono::milliseconds read_timeout{30000};
  // /v1/chat/completions: the served model's chat template and special-token strings; without
  // a template, chat requests get 400 with `chat_unavailable` as the message.
  std::shared_ptr<const ChatTemplate> chat_template;
  std::string chat_unavailable;
  std::string bos_token;
  std::string eos_token;
};

class OpenAiGateway {
 public:
  // Binds and starts serving on its own I/O thread. INVALID_ARGUMENT for bad options,
  // UNAVAILABLE when the port cannot be bound.
  static absl::StatusOr<std::unique_ptr<OpenAiGateway>> Start(OpenAiGatewayOptions options);
  ~OpenAiGateway();  // Stop()
  OpenAiGateway(const OpenAiGateway&) = delete;
  OpenAiGateway& operator=(const OpenAiGateway&) = delete;

  // Stops accepting connections; requests already in flight continue (drain). Idempotent.
  void StopAccepting();
  // Cancels every in-flight gRPC call (the router frees their KV), closes every connection and
  // joins the I/O thread. Idempotent.
  void Stop();

  int port() const;
  std::string address() const;  // HOST:PORT (127.0.0.1 for a wildcard bind)

  class Core;  // implementation (openai_gateway.cc)

 private:
  explicit OpenAiGateway(std::unique_ptr<Core> core);
  std::unique_ptr<Core> core_;
};

}  // namespace tandem
