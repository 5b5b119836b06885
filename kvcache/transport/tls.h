// TLS settings for the KV data plane (OpenSSL through Boost.Asio SSL). PEM text, not file names:
// the configuration layer reads files; tests generate certificates in memory.
#pragma once

#include <string>

namespace tandem {

struct KvTlsServerOptions {
  bool enabled = false;
  std::string cert_chain_pem;  // server certificate (+ intermediates)
  std::string private_key_pem;
};

struct KvTlsClientOptions {
  bool enabled = false;
  std::string ca_pem;       // trusted roots for the receiver's certificate
  std::string server_name;  // checked against the certificate (and sent as SNI); empty: no check
};

}  // namespace tandem
