// A byte stream that is plain TCP or TLS over TCP, chosen at run time, with the few async
// operations the KV transport needs. Transport-internal: includes Asio.
#pragma once

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/write.hpp>
#include <memory>
#include <optional>

namespace tandem::internal {

// Completion condition for reading or writing exactly `total` bytes in as few system calls as
// the kernel allows. Asio's transfer_all/transfer_exactly cap each call at 64 KiB; a 2 MiB LAYER
// frame would cost 32+ calls.
struct TransferRemaining {
  size_t total;
  size_t operator()(const boost::system::error_code& ec, size_t done) const {
    return ec || done >= total ? 0 : total - done;
  }
};

class KvStream {
 public:
  using tcp = boost::asio::ip::tcp;
  using TlsStream = boost::asio::ssl::stream<tcp::socket>;

  // `tls` null: plain TCP. The context must outlive the stream.
  KvStream(tcp::socket socket, boost::asio::ssl::context* tls) {
    if (tls != nullptr) {
      tls_.emplace(std::move(socket), *tls);
    } else {
      plain_.emplace(std::move(socket));
    }
  }

  bool is_tls() const { return tls_.has_value(); }
  tcp::socket& socket() { return tls_ ? tls_->next_layer() : *plain_; }
  TlsStream& tls() { return *tls_; }

  // Reads/writes all of `buffers` (TLS: record-sized pieces, as the SSL layer dictates).
  template <typename Buffers, typename Handler>
  void AsyncRead(const Buffers& buffers, Handler&& handler) {
    const TransferRemaining all{boost::asio::buffer_size(buffers)};
    if (tls_) {
      boost::asio::async_read(*tls_, buffers, all, std::forward<Handler>(handler));
    } else {
      boost::asio::async_read(*plain_, buffers, all, std::forward<Handler>(handler));
    }
  }

  // One read of whatever is available (at least one byte), into `buffers` in order.
  template <typename Buffers, typename Handler>
  void AsyncReadSome(const Buffers& buffers, Handler&& handler) {
    if (tls_) {
      tls_->async_read_some(buffers, std::forward<Handler>(handler));
    } else {
      plain_->async_read_some(buffers, std::forward<Handler>(handler));
    }
  }

  template <typename Buffers, typename Handler>
  void AsyncWrite(const Buffers& buffers, Handler&& handler) {
    const TransferRemaining all{boost::asio::buffer_size(buffers)};
    if (tls_) {
      boost::asio::async_write(*tls_, buffers, all, std::forward<Handler>(handler));
    } else {
      boost::asio::async_write(*plain_, buffers, all, std::forward<Handler>(handler));
    }
  }

  // Closes the socket (pending operations complete with operation_aborted). No TLS close_notify:
  // the KV protocol ends transfers with its own messages, not with the stream.
  void Close() {
    boost::system::error_code ignored;
    socket().shutdown(tcp::socket::shutdown_both, ignored);
    socket().close(ignored);
  }

 private:
  std::optional<tcp::socket> plain_;
  std::optional<TlsStream> tls_;
};

}  // namespace tandem::internal
