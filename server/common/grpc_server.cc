// gRPC server start-up with health and reflection: see grpc_server.h.
#include "server/common/grpc_server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <mutex>

namespace tandem {

absl::StatusOr<std::unique_ptr<GrpcServer>> GrpcServer::Start(
    const GrpcServerOptions& options, const std::vector<grpc::Service*>& services) {
  static std::once_flag once;
  std::call_once(once, [] {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  });
  if (options.port < 0 || options.port > 65535) {
    return absl::InvalidArgumentError("grpc port must be in [0, 65535]");
  }
  std::unique_ptr<GrpcServer> s(new GrpcServer());
  s->host_ = options.bind_address;
  const bool v6 = s->host_.find(':') != std::string::npos;
  const std::string listen =
      (v6 ? "[" + s->host_ + "]" : s->host_) + ":" + std::to_string(options.port);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &s->port_);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  for (grpc::Service* svc : services) builder.RegisterService(svc);
  s->server_ = builder.BuildAndStart();
  if (s->server_ == nullptr || s->port_ == 0) {
    return absl::UnavailableError("cannot listen for gRPC on " + listen +
                                  " (address in use or not local?)");
  }
  return s;
}

GrpcServer::~GrpcServer() { Shutdown(std::chrono::milliseconds(0)); }

std::string GrpcServer::address() const {
  std::string host = host_;
  if (host == "0.0.0.0" || host.empty()) host = "127.0.0.1";
  if (host == "::") host = "::1";
  const bool v6 = host.find(':') != std::string::npos;
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port_);
}

void GrpcServer::SetServing(bool serving) {
  if (server_ != nullptr && server_->GetHealthCheckService() != nullptr) {
    server_->GetHealthCheckService()->SetServingStatus(serving);
  }
}

void GrpcServer::Shutdown(std::chrono::milliseconds grace) {
  if (shut_down_ || server_ == nullptr) {
    return;
  }
  shut_down_ = true;
  SetServing(false);
  server_->Shutdown(std::chrono::system_clock::now() + grace);
  server_->Wait();
}

}  // namespace tandem
