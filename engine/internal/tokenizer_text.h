// Text utilities shared by the tokenizer pipeline: strict UTF-8 validation, lossy UTF-8 decoding,
// the GPT-2 byte-level alphabet, Unicode normalisation (ICU) and HF's decode clean-up pass.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace tandem::internal {

// Debian's Abseil has its own string_view type, which does not convert from std::string_view.
inline absl::string_view AsAbsl(std::string_view text) {
  return absl::string_view(text.data(), text.size());
}

// Offset of the first byte that does not start (or continue) a well-formed UTF-8 sequence
// (overlong forms, surrogates and code points above U+10FFFF are ill-formed), or nullopt.
std::optional<size_t> FindInvalidUtf8(std::string_view text);

// INVALID_ARGUMENT naming the byte offset when `text` is not well-formed UTF-8.
absl::Status ValidateUtf8(std::string_view text);

// Length in bytes of the UTF-8 sequence whose lead byte is `lead`; 1 for stray bytes, so that
// callers walking untrusted text always make progress.
inline size_t Utf8SequenceLength(unsigned char lead) {
  if (lead < 0x80) {
    return 1;
  }
  if ((lead & 0xE0) == 0xC0) {
    return 2;
  }
  if ((lead & 0xF0) == 0xE0) {
    return 3;
  }
  if ((lead & 0xF8) == 0xF0) {
    return 4;
  }
  return 1;
}

// Appends the UTF-8 encoding of `cp` (which must be a Unicode scalar value).
void AppendUtf8(char32_t cp, std::string* out);

// Decodes `bytes` as UTF-8, replacing each maximal ill-formed subpart with U+FFFD (the Unicode
// "best practice" that Rust's from_utf8_lossy and the WHATWG decoder follow).
std::string DecodeUtf8Lossy(std::string_view bytes);

inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// The GPT-2 byte-level alphabet: every byte maps to a printable code point so that BPE
// vocabularies can be stored as text.
class ByteLevelAlphabet {
 public:
  static const ByteLevelAlphabet& Get();

  // UTF-8 encoding of the code point that stands for `byte`.
  std::string_view Encode(uint8_t byte) const { return encoded_[byte]; }
  // The byte a code point stands for, or -1 when it is not part of the alphabet.
  int Decode(char32_t cp) const { return cp < decoded_.size() ? decoded_[cp] : -1; }

  // Maps every byte of `bytes` to its code point.
  void EncodeAppend(std::string_view bytes, std::string* out) const;
  // Maps the code points of `text` back to bytes; false (and `out` untouched) when some code
  // point is not in the alphabet.
  bool DecodeAppend(std::string_view text, std::string* out) const;

 private:
  ByteLevelAlphabet();
  std::array<std::string, 256> encoded_;
  std::array<int16_t, 324> decoded_;  // the alphabet's code points are all below 324
};

enum class NormalizationForm { kNfc, kNfd, kNfkc, kNfkd };

// Unicode normalisation of valid UTF-8 text.
absl::Status NormalizeUnicode(NormalizationForm form, std::string* text);
// Full Unicode lower-casing (root locale) of valid UTF-8 text.
absl::Status LowercaseUnicode(std::string* text);

// HF `clean_up_tokenization`: removes the space before punctuation and English contractions
// (" ." -> ".", " n't" -> "n't", ...), applied as the same sequence of replace-all passes.
std::string CleanUpTokenizationSpaces(std::string_view text);

// Length of the longest prefix of `text` that CleanUpTokenizationSpaces can process on its own:
// cleaning the prefix and the rest separately gives the same result as cleaning the whole text,
// whatever is later appended to the rest. Used to stream cleaned text.
size_t CleanUpSafePrefix(std::string_view text);

}  // namespace tandem::internal
