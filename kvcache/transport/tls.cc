// Asio SSL contexts for the KV data plane. Asio reports errors by exception here; they are caught
// at this boundary and returned as statuses.
#include "absl/strings/str_cat.h"
#include "kvcache/transport/internal/tls_context.h"

namespace tandem::internal {
namespace ssl = boost::asio::ssl;

namespace {
constexpr auto kOptions = ssl::context::default_workarounds | ssl::context::no_sslv2 |
                          ssl::context::no_sslv3 | ssl::context::no_tlsv1 |
                          ssl::context::no_tlsv1_1 | ssl::context::single_dh_use;
}  // namespace

absl::StatusOr<std::unique_ptr<ssl::context>> MakeServerTlsContext(
    const KvTlsServerOptions& options) {
  try {
    auto ctx = std::make_unique<ssl::context>(ssl::context::tls_server);
    ctx->set_options(kOptions);
    ctx->use_certificate_chain(
        boost::asio::buffer(options.cert_chain_pem.data(), options.cert_chain_pem.size()));
    ctx->use_private_key(
        boost::asio::buffer(options.private_key_pem.data(), options.private_key_pem.size()),
        ssl::context::pem);
    return ctx;
  } catch (const boost::system::system_error& e) {
    return absl::InvalidArgumentError(absl::StrCat("TLS server setup: ", e.what()));
  }
}

absl::StatusOr<std::unique_ptr<ssl::context>> MakeClientTlsContext(
    const KvTlsClientOptions& options) {
  try {
    auto ctx = std::make_unique<ssl::context>(ssl::context::tls_client);
    ctx->set_options(kOptions);
    ctx->add_certificate_authority(
        boost::asio::buffer(options.ca_pem.data(), options.ca_pem.size()));
    ctx->set_verify_mode(ssl::verify_peer);
    if (!options.server_name.empty()) {
      ctx->set_verify_callback(ssl::host_name_verification(options.server_name));
    }
    return ctx;
  } catch (const boost::system::system_error& e) {
    return absl::InvalidArgumentError(absl::StrCat("TLS client setup: ", e.what()));
  }
}

}  // namespace tandem::internal
