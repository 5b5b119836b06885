// A gRPC server as every Tandem process runs it: explicit bind address, port 0 picks a free
// one, the standard grpc.health.v1 service and server reflection, callback services only.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace grpc {
class Server;
class Service;
}  // namespace grpc

namespace tandem {

struct GrpcServerOptions {
  std::string bind_address = "127.0.0.1";
  int port = 0;
  int max_message_bytes = 64 << 20;
};

class GrpcServer {
 public:
  // Registers `services` (not owned; they must outlive the server) and starts serving; health
  // starts SERVING.
  static absl::StatusOr<std::unique_ptr<GrpcServer>> Start(const GrpcServerOptions& options,
                                                           const std::vector<grpc::Service*>& services);
  ~GrpcServer();  // Shutdown(0)
  GrpcServer(const GrpcServer&) = delete;
  GrpcServer& operator=(const GrpcServer&) = delete;

  int port() const { return port_; }
  // "host:port" that peers on this machine can dial.
  std::string address() const;
  // grpc.health.v1: overall ("") and per-service status.
  void SetServing(bool serving);
  // Stops accepting calls; calls still running after `grace` are cancelled. Idempotent.
  void Shutdown(std::chrono::milliseconds grace);

 private:
  GrpcServer() = default;
  std::unique_ptr<grpc::Server> server_;
  std::string host_;
  int port_ = 0;
  bool shut_down_ = false;
};

}  // namespace tandem
