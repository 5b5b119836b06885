// Helpers for KV transport tests: a hand-driven peer on a real loopback socket (to send hostile
// bytes) and an in-memory self-signed certificate for TLS.
#pragma once

#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "kvcache/wire_format.h"

namespace tandem::testing {

struct OwnedResult {
  uint64_t transfer_id = 0;
  absl::StatusCode code = absl::StatusCode::kOk;
  TransferError reason = TransferError::kOk;
  std::string text;
};

// A sender that writes whatever bytes a test wants, with bounded waits for what comes back.
class RawPeer {
 public:
  using tcp = boost::asio::ip::tcp;

  explicit RawPeer(uint16_t port) : socket_(io_) {
    boost::system::error_code ec;
    socket_.connect(tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), port), ec);
    EXPECT_FALSE(ec) << ec.message();
    socket_.set_option(tcp::no_delay(true), ec);
  }

  // Sends HELLO and expects the receiver's HELLO back.
  void Handshake(std::string_view auth = "") {
    HelloFrame h;
    h.auth = auth;
    SendFrame(h);
    auto reply = ReadFrame();
    ASSERT_TRUE(reply.has_value());
    ASSERT_EQ(reply->first, FrameType::kHello);
  }

  void Send(std::span<const std::byte> bytes) {
    boost::system::error_code ec;
    boost::asio::write(socket_, boost::asio::buffer(bytes.data(), bytes.size()), ec);
    EXPECT_FALSE(ec) << ec.message();
  }

  template <typename F>
  void SendFrame(const F& f) {
    std::vector<std::byte> b(EncodedSize(f));
    Encode(f, b);
    Send(b);
  }

  // Reads one frame (type, body) within `timeout`; nullopt on timeout or close.
  std::optional<std::pair<FrameType, std::vector<std::byte>>> ReadFrame(
      std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
    std::vector<std::byte> header(kFrameHeaderBytes);
    if (!ReadExactly(header, timeout)) return std::nullopt;
    auto h = DecodeFrameHeader(header, kDefaultMaxFrameBytes);
    if (!h.ok()) {
      ADD_FAILURE() << h.status();
      return std::nullopt;
    }
    std::vector<std::byte> body(h->body_bytes);
    if (!body.empty() && !ReadExactly(body, timeout)) return std::nullopt;
    return std::make_pair(h->type, std::move(body));
  }

  // Next RESULT frame (skipping nothing else: anything but RESULT fails the test).
  std::optional<OwnedResult> ReadResult(
      std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
    auto f = ReadFrame(timeout);
    if (!f) return std::nullopt;
    EXPECT_EQ(f->first, FrameType::kResult);
    auto d = DecodeFrameBody(f->first, f->second);
    if (!d.ok() || !std::holds_alternative<ResultFrame>(*d)) return std::nullopt;
    const auto& r = std::get<ResultFrame>(*d);
    return OwnedResult{r.transfer_id, r.code, r.reason, std::string(r.text)};
  }

  // True once the receiver has closed the connection (read returns EOF/error) within `timeout`.
  bool WaitClosed(std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
    std::vector<std::byte> sink(4096);
    for (;;) {
      bool eof = false;
      bool done = false;
      socket_.async_read_some(boost::asio::buffer(sink.data(), sink.size()),
                              [&](boost::system::error_code ec, size_t) {
                                done = true;
                                eof = static_cast<bool>(ec);
                              });
      io_.restart();
      io_.run_for(timeout);
      if (!done) {
        socket_.cancel();
        io_.restart();
        io_.run();
        return false;
      }
      if (eof) return true;
    }
  }

  void Close() {
    boost::system::error_code ec;
    socket_.shutdown(tcp::socket::shutdown_both, ec);
    socket_.close(ec);
  }

 private:
  bool ReadExactly(std::vector<std::byte>& buf, std::chrono::milliseconds timeout) {
    bool done = false;
    boost::system::error_code result;
    boost::asio::async_read(socket_, boost::asio::buffer(buf.data(), buf.size()),
                            [&](boost::system::error_code ec, size_t) {
                              done = true;
                              result = ec;
                            });
    io_.restart();
    io_.run_for(timeout);
    if (!done) {
      socket_.cancel();
      io_.restart();
      io_.run();
      return false;
    }
    return !result;
  }

  boost::asio::io_context io_;
  tcp::socket socket_;
};

struct TestCert {
  std::string cert_pem;
  std::string key_pem;
};

// A self-signed P-256 certificate for "localhost" / 127.0.0.1, valid for a day.
inline TestCert MakeSelfSignedCert() {
  TestCert out;
  EVP_PKEY* key = EVP_EC_gen("P-256");
  X509* x = X509_new();
  X509_set_version(x, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
  X509_gmtime_adj(X509_getm_notBefore(x), -3600);
  X509_gmtime_adj(X509_getm_notAfter(x), 86400);
  X509_set_pubkey(x, key);
  X509_NAME* name = X509_get_subject_name(x);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>("localhost"), -1, -1, 0);
  X509_set_issuer_name(x, name);
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, x, x, nullptr, nullptr, 0);
  for (auto [nid, value] : {std::pair{NID_subject_alt_name, "DNS:localhost,IP:127.0.0.1"},
                            std::pair{NID_basic_constraints, "critical,CA:TRUE"}}) {
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
    X509_add_ext(x, ext, -1);
    X509_EXTENSION_free(ext);
  }
  X509_sign(x, key, EVP_sha256());
  auto to_string = [](BIO* bio) {
    char* data = nullptr;
    const long n = BIO_get_mem_data(bio, &data);
    std::string s(data, static_cast<size_t>(n));
    BIO_free(bio);
    return s;
  };
  BIO* cb = BIO_new(BIO_s_mem());
  PEM_write_bio_X509(cb, x);
  out.cert_pem = to_string(cb);
  BIO* kb = BIO_new(BIO_s_mem());
  PEM_write_bio_PrivateKey(kb, key, nullptr, nullptr, 0, nullptr, nullptr);
  out.key_pem = to_string(kb);
  X509_free(x);
  EVP_PKEY_free(key);
  return out;
}

}  // namespace tandem::testing
