// Streamed output text: see text_stream.h.
#include "engine/text_stream.h"

#include <algorithm>

namespace tandem {
namespace {
// Length of the longest prefix of `s` no longer than `n` that ends on a UTF-8 character boundary.
size_t Utf8SafeLength(const std::string& s, size_t n) {
  while (n > 0 && n < s.size() && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
  return n;
}
}  // namespace

TextStream::TextStream(const Tokenizer& tokenizer, std::span<const int32_t> context,
                       std::vector<std::string> stop)
    : detok_(tokenizer, context, true), stop_(std::move(stop)) {
  for (const std::string& s : stop_) max_stop_len_ = std::max(max_stop_len_, s.size());
}

std::string TextStream::Push(int32_t token, bool* stopped) {
  *stopped = false;
  held_ += detok_.Push(token);
  if (max_stop_len_ > 0) {
    size_t cut = std::string::npos;
    for (const std::string& stop : stop_) cut = std::min(cut, held_.find(stop));
    if (cut != std::string::npos) {
      std::string out = held_.substr(0, cut);
      held_.clear();
      *stopped = true;
      return out;
    }
  }
  // Hold back what could still become the start of a stop string.
  const size_t keep = max_stop_len_ > 0 ? max_stop_len_ - 1 : 0;
  if (held_.size() <= keep) {
    return {};
  }
  const size_t n = Utf8SafeLength(held_, held_.size() - keep);
  std::string out = held_.substr(0, n);
  held_.erase(0, n);
  return out;
}

std::string TextStream::Finish(bool flush_tail) {
  std::string out = std::move(held_);
  held_.clear();
  if (flush_tail) out += detok_.Flush();
  return out;
}

}  // namespace tandem
