// PCRE2 wrapper for the tokenizer's regular expressions.
#include "engine/internal/tokenizer_regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "engine/internal/tokenizer_text.h"

namespace tandem::internal {
namespace {

std::string Pcre2Message(int code) {
  PCRE2_UCHAR buffer[256];
  if (pcre2_get_error_message(code, buffer, sizeof(buffer)) < 0) {
    return absl::StrCat("PCRE2 error ", code);
  }
  return std::string(reinterpret_cast<const char*>(buffer));
}

// Per-thread match context whose JIT stack may grow to a few MiB: the 32 KiB default on the
// machine stack is too small for long runs of one character class in megabyte-sized inputs.
class ThreadMatchContext {
 public:
  ThreadMatchContext() {
    context_ = pcre2_match_context_create(nullptr);
    stack_ = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
    if (context_ != nullptr && stack_ != nullptr) {
      pcre2_jit_stack_assign(context_, nullptr, stack_);
    }
  }
  ~ThreadMatchContext() {
    pcre2_jit_stack_free(stack_);
    pcre2_match_context_free(context_);
  }
  ThreadMatchContext(const ThreadMatchContext&) = delete;
  ThreadMatchContext& operator=(const ThreadMatchContext&) = delete;

  pcre2_match_context* get() { return context_; }

 private:
  pcre2_match_context* context_ = nullptr;
  pcre2_jit_stack* stack_ = nullptr;
};

pcre2_code* AsCode(void* code) { return static_cast<pcre2_code*>(code); }

}  // namespace

absl::StatusOr<std::unique_ptr<TokenizerRegex>> TokenizerRegex::Compile(std::string_view pattern) {
  int error = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   PCRE2_UTF | PCRE2_UCP, &error, &error_offset, nullptr);
  if (code == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("regex '", AsAbsl(pattern),
                                                   "' does not compile at ", error_offset, ": ",
                                                   Pcre2Message(error)));
  }
  // JIT is an optimisation only: without it pcre2_match interprets the pattern.
  (void)pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  return std::unique_ptr<TokenizerRegex>(new TokenizerRegex(code));
}

TokenizerRegex::~TokenizerRegex() { pcre2_code_free(AsCode(code_)); }

absl::Status TokenizerRegex::FindAll(std::string_view text,
                                     std::vector<std::pair<size_t, size_t>>* matches) const {
  thread_local ThreadMatchContext context;
  pcre2_match_data* data = pcre2_match_data_create_from_pattern(AsCode(code_), nullptr);
  if (data == nullptr) {
    return absl::ResourceExhaustedError("cannot allocate regex match data");
  }
  absl::Status status;
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t offset = 0;
  while (offset < text.size()) {
    // The text was validated once by the caller; PCRE2 would otherwise re-check all of it on
    // every call, which is quadratic over a long input.
    const int rc = pcre2_match(AsCode(code_), subject, text.size(), offset, PCRE2_NO_UTF_CHECK,
                               data, context.get());
    if (rc == PCRE2_ERROR_NOMATCH) {
      break;
    }
    if (rc < 0) {
      status =
          absl::ResourceExhaustedError(absl::StrCat("regex matching failed: ", Pcre2Message(rc)));
      break;
    }
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data);
    const size_t begin = ovector[0];
    const size_t end = ovector[1];
    if (end <= begin || begin < offset) {
      // An empty match (or a \K oddity): step over one character and search on.
      const size_t at = begin < offset ? offset : begin;
      if (at >= text.size()) {
        break;
      }
      offset = at + Utf8SequenceLength(static_cast<unsigned char>(text[at]));
      continue;
    }
    matches->emplace_back(begin, end);
    offset = end;
  }
  pcre2_match_data_free(data);
  return status;
}

}  // namespace tandem::internal
