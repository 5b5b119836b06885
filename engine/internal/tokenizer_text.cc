// Text utilities for the tokenizer: UTF-8 handling, the byte-level alphabet, ICU normalisation.
#include "engine/internal/tokenizer_text.h"

#include <unicode/locid.h>
#include <unicode/normalizer2.h>
#include <unicode/unistr.h>

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace tandem::internal {
namespace {

// Result of looking at the sequence starting at text[i]: its length when well-formed, otherwise
// the length of its maximal ill-formed subpart (at least 1).
struct Utf8Scan {
  bool valid;
  size_t length;
};

Utf8Scan ScanUtf8(std::string_view text, size_t i) {
  const auto b0 = static_cast<unsigned char>(text[i]);
  if (b0 < 0x80) {
    return {true, 1};
  }
  size_t length;
  unsigned char lo = 0x80;
  unsigned char hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    length = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    length = 3;
    if (b0 == 0xE0) {
      lo = 0xA0;  // overlong below
    } else if (b0 == 0xED) {
      hi = 0x9F;  // surrogates above
    }
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    length = 4;
    if (b0 == 0xF0) {
      lo = 0x90;
    } else if (b0 == 0xF4) {
      hi = 0x8F;  // above U+10FFFF
    }
  } else {
    return {false, 1};
  }
  for (size_t k = 1; k < length; ++k) {
    if (i + k >= text.size()) {
      return {false, k};
    }
    const auto b = static_cast<unsigned char>(text[i + k]);
    const unsigned char min = k == 1 ? lo : 0x80;
    const unsigned char max = k == 1 ? hi : 0xBF;
    if (b < min || b > max) {
      return {false, k};
    }
  }
  return {true, length};
}

bool IsAscii(std::string_view text) {
  return std::all_of(text.begin(), text.end(),
                     [](char c) { return static_cast<unsigned char>(c) < 0x80; });
}

// Characters that can take part in a clean-up pattern; see CleanUpSafePrefix.
bool InCleanUpAlphabet(char c) {
  switch (c) {
    case ' ':
    case '.':
    case '?':
    case '!':
    case ',':
    case '\'':
    case 'n':
    case 't':
    case 'm':
    case 's':
    case 'v':
    case 'e':
    case 'r':
      return true;
    default:
      return false;
  }
}

void ReplaceAll(std::string_view from, std::string_view to, std::string* text) {
  std::string out;
  size_t pos = 0;
  while (true) {
    const size_t hit = text->find(from, pos);
    if (hit == std::string::npos) {
      break;
    }
    out.append(*text, pos, hit - pos);
    out.append(to);
    pos = hit + from.size();
  }
  if (pos == 0) {
    return;
  }
  out.append(*text, pos, std::string::npos);
  *text = std::move(out);
}

}  // namespace

std::optional<size_t> FindInvalidUtf8(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    // ASCII runs dominate real text; skip them without the full scan.
    if (static_cast<unsigned char>(text[i]) < 0x80) {
      ++i;
      continue;
    }
    const Utf8Scan scan = ScanUtf8(text, i);
    if (!scan.valid) {
      return i;
    }
    i += scan.length;
  }
  return std::nullopt;
}

absl::Status ValidateUtf8(std::string_view text) {
  if (const auto bad = FindInvalidUtf8(text)) {
    return absl::InvalidArgumentError(absl::StrCat("invalid UTF-8 at byte offset ", *bad));
  }
  return absl::OkStatus();
}

void AppendUtf8(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string DecodeUtf8Lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t i = 0;
  while (i < bytes.size()) {
    const Utf8Scan scan = ScanUtf8(bytes, i);
    if (scan.valid) {
      out.append(bytes.substr(i, scan.length));
    } else {
      out.append(kReplacementChar);
    }
    i += scan.length;
  }
  return out;
}

const ByteLevelAlphabet& ByteLevelAlphabet::Get() {
  static const ByteLevelAlphabet* const alphabet = new ByteLevelAlphabet();
  return *alphabet;
}

ByteLevelAlphabet::ByteLevelAlphabet() {
  decoded_.fill(-1);
  // Printable Latin-1 bytes stand for themselves; the rest are shifted past U+00FF in order.
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    const char32_t cp = printable ? static_cast<char32_t>(b) : next++;
    AppendUtf8(cp, &encoded_[b]);
    decoded_[cp] = static_cast<int16_t>(b);
  }
}

void ByteLevelAlphabet::EncodeAppend(std::string_view bytes, std::string* out) const {
  for (const char c : bytes) {
    out->append(encoded_[static_cast<unsigned char>(c)]);
  }
}

bool ByteLevelAlphabet::DecodeAppend(std::string_view text, std::string* out) const {
  const size_t original_size = out->size();
  size_t i = 0;
  while (i < text.size()) {
    const auto b0 = static_cast<unsigned char>(text[i]);
    char32_t cp;
    if (b0 < 0x80) {
      cp = b0;
      i += 1;
    } else if ((b0 & 0xE0) == 0xC0 && i + 1 < text.size()) {
      cp = (static_cast<char32_t>(b0 & 0x1F) << 6) |
           (static_cast<unsigned char>(text[i + 1]) & 0x3F);
      i += 2;
    } else {
      cp = 0xFFFFFFFF;  // every alphabet code point is at most two bytes long
    }
    const int byte = Decode(cp);
    if (byte < 0) {
      out->resize(original_size);
      return false;
    }
    out->push_back(static_cast<char>(byte));
  }
  return true;
}

absl::Status NormalizeUnicode(NormalizationForm form, std::string* text) {
  if (IsAscii(*text)) {
    return absl::OkStatus();  // ASCII is invariant under all four forms
  }
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* normalizer = nullptr;
  switch (form) {
    case NormalizationForm::kNfc:
      normalizer = icu::Normalizer2::getNFCInstance(status);
      break;
    case NormalizationForm::kNfd:
      normalizer = icu::Normalizer2::getNFDInstance(status);
      break;
    case NormalizationForm::kNfkc:
      normalizer = icu::Normalizer2::getNFKCInstance(status);
      break;
    case NormalizationForm::kNfkd:
      normalizer = icu::Normalizer2::getNFKDInstance(status);
      break;
  }
  if (U_FAILURE(status) || normalizer == nullptr) {
    return absl::InternalError(absl::StrCat("ICU normalizer unavailable: ", u_errorName(status)));
  }
  const icu::UnicodeString source = icu::UnicodeString::fromUTF8(
      icu::StringPiece(text->data(), static_cast<int32_t>(text->size())));
  if (normalizer->isNormalized(source, status) && U_SUCCESS(status)) {
    return absl::OkStatus();
  }
  status = U_ZERO_ERROR;
  const icu::UnicodeString normalized = normalizer->normalize(source, status);
  if (U_FAILURE(status)) {
    return absl::InternalError(absl::StrCat("ICU normalisation failed: ", u_errorName(status)));
  }
  text->clear();
  normalized.toUTF8String(*text);
  return absl::OkStatus();
}

absl::Status LowercaseUnicode(std::string* text) {
  if (IsAscii(*text)) {
    std::transform(text->begin(), text->end(), text->begin(), [](char c) {
      return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
    });
    return absl::OkStatus();
  }
  icu::UnicodeString source = icu::UnicodeString::fromUTF8(
      icu::StringPiece(text->data(), static_cast<int32_t>(text->size())));
  source.toLower(icu::Locale::getRoot());
  text->clear();
  source.toUTF8String(*text);
  return absl::OkStatus();
}

std::string CleanUpTokenizationSpaces(std::string_view text) {
  std::string out(text);
  // The order matters (" ' " runs before " 's"): it is HF's.
  static constexpr std::pair<std::string_view, std::string_view> kPasses[] = {
      {" .", "."},     {" ?", "?"},   {" !", "!"},   {" ,", ","},     {" ' ", "'"},
      {" n't", "n't"}, {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"},
  };
  for (const auto& [from, to] : kPasses) {
    ReplaceAll(from, to, &out);
  }
  return out;
}

size_t CleanUpSafePrefix(std::string_view text) {
  // Every pattern starts with a space and uses only InCleanUpAlphabet characters, and passes only
  // delete spaces. A cut between text[p-1] and text[p] is therefore never crossed by a match if
  // either side is outside that alphabet, or if text[p] is a space that no pattern can hold in
  // a non-leading position (only " ' " does, right after the quote).
  for (size_t p = text.size(); p > 0; --p) {
    if (p < text.size() && (static_cast<unsigned char>(text[p]) & 0xC0) == 0x80) {
      continue;  // never cut inside a character
    }
    const char before = text[p - 1];
    if (!InCleanUpAlphabet(before)) {
      return p;
    }
    if (p < text.size()) {
      const char after = text[p];
      if (!InCleanUpAlphabet(after) || (after == ' ' && before != ' ' && before != '\'')) {
        return p;
      }
    }
  }
  return 0;
}

}  // namespace tandem::internal
