// Builds Asio SSL contexts from KvTls*Options. Transport-internal: includes Asio.
#pragma once

#include <boost/asio/ssl.hpp>
#include <memory>

#include "absl/status/statusor.h"
#include "kvcache/transport/tls.h"

namespace tandem::internal {

absl::StatusOr<std::unique_ptr<boost::asio::ssl::context>> MakeServerTlsContext(
    const KvTlsServerOptions& options);
absl::StatusOr<std::unique_ptr<boost::asio::ssl::context>> MakeClientTlsContext(
    const KvTlsClientOptions& options);

}  // namespace tandem::internal
