// Registration and heartbeats: see registration.h.
#include "server/common/registration.h"

#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "tandem/internal/v1/worker.grpc.pb.h"

namespace tandem {

class RegistrationClient::Impl {
 public:
  explicit Impl(RegistrationOptions options) : options_(std::move(options)) {
    stub_ = internal::v1::Registry::NewStub(
        grpc::CreateChannel(options_.router_address, grpc::InsecureChannelCredentials()));
    thread_ = std::thread([this] { Run(); });
  }
  ~Impl() {
    {
      absl::MutexLock l(&mu_);
      stop_ = true;
    }
    thread_.join();
  }
  bool registered() const {
    absl::MutexLock l(&mu_);
    return registered_;
  }
  bool WaitRegistered(std::chrono::milliseconds timeout) const {
    absl::MutexLock l(&mu_);
    auto done = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return registered_; };
    return mu_.AwaitWithTimeout(absl::Condition(&done), absl::FromChrono(timeout));
  }
  void Poke() {
    absl::MutexLock l(&mu_);
    poked_ = true;
  }

 private:
  void Run() {
    std::chrono::milliseconds interval = options_.retry_interval;
    bool reported_failure = false;
    for (;;) {
      {
        absl::MutexLock l(&mu_);
        auto wake = [this] { return stop_ || poked_; };
        mu_.AwaitWithTimeout(absl::Condition(&wake), absl::FromChrono(interval));
        if (stop_) return;
        poked_ = false;
      }
      const bool was_registered = registered();
      bool ok = false;
      if (!was_registered) {
        internal::v1::RegisterRequest req;
        *req.mutable_info() = options_.info();
        internal::v1::RegisterResponse resp;
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
        const grpc::Status st = stub_->Register(&ctx, req, &resp);
        ok = st.ok();
        if (ok) {
          interval = std::chrono::milliseconds(std::max(50, resp.heartbeat_interval_ms()));
          std::fprintf(stderr, "registered with router %s\n", options_.router_address.c_str());
          reported_failure = false;
        } else if (!reported_failure || st.error_code() == grpc::StatusCode::FAILED_PRECONDITION) {
          std::fprintf(stderr, "registration with router %s failed: %s\n",
                       options_.router_address.c_str(), st.error_message().c_str());
          reported_failure = true;
        }
      } else {
        internal::v1::HeartbeatRequest req;
        const internal::v1::WorkerInfo info = options_.info();
        req.set_name(info.name());
        req.set_incarnation_id(info.incarnation_id());
        *req.mutable_load() = options_.load();
        req.set_draining(options_.draining());
        internal::v1::HeartbeatResponse resp;
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
        ok = stub_->Heartbeat(&ctx, req, &resp).ok() && resp.known();
      }
      absl::MutexLock l(&mu_);
      registered_ = ok;
      if (!ok) interval = options_.retry_interval;
      if (!ok && was_registered) poked_ = true;  // re-register at once
    }
  }

  const RegistrationOptions options_;
  std::unique_ptr<internal::v1::Registry::Stub> stub_;
  mutable absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool poked_ ABSL_GUARDED_BY(mu_) = true;  // register at once
  bool registered_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

RegistrationClient::RegistrationClient(RegistrationOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {}
RegistrationClient::~RegistrationClient() = default;
bool RegistrationClient::registered() const { return impl_->registered(); }
bool RegistrationClient::WaitRegistered(std::chrono::milliseconds timeout) const {
  return impl_->WaitRegistered(timeout);
}
void RegistrationClient::Poke() { impl_->Poke(); }

}  // namespace tandem
