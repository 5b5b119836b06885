// A compiled PCRE2 pattern (Unicode mode, JIT when available) for the tokenizer's Split
// pre-tokenizer and Replace normalizer/decoder. HF writes these patterns for Oniguruma; the
// constructs they use (\p{..}, (?i:..), lookahead) mean the same in PCRE2 with UTF + UCP.
#pragma once

#include <memory>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tandem::internal {

class TokenizerRegex {
 public:
  // INVALID_ARGUMENT (with PCRE2's message and offset) when the pattern does not compile.
  static absl::StatusOr<std::unique_ptr<TokenizerRegex>> Compile(std::string_view pattern);
  ~TokenizerRegex();
  TokenizerRegex(const TokenizerRegex&) = delete;
  TokenizerRegex& operator=(const TokenizerRegex&) = delete;

  // Appends the [begin, end) byte ranges of the non-overlapping matches in `text`, left to right.
  // `text` must be valid UTF-8 (the caller validated it). Empty matches are skipped. Fails only
  // when PCRE2 hits a resource limit, which a hostile pattern in a model folder could provoke.
  // Thread-safe.
  absl::Status FindAll(std::string_view text,
                       std::vector<std::pair<size_t, size_t>>* matches) const;

 private:
  explicit TokenizerRegex(void* code) : code_(code) {}
  void* code_;  // pcre2_code_8*, kept opaque so that users need not include pcre2.h
};

}  // namespace tandem::internal
