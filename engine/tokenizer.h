// Hugging Face `tokenizer.json` tokenizers: byte-level BPE (GPT-2 / Llama-3 / Qwen style) and
// SentencePiece-style BPE with byte fallback (Llama-2 / Mistral), with added and special tokens,
// and the normalizers, pre-tokenizers, post-processors and decoders those families use.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace tandem {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Loads `dir/tokenizer.json` and, if present, `dir/tokenizer_config.json`. The vocabulary and
  // merges are validated at load; unsupported model/normalizer/pre-tokenizer/decoder types are
  // refused with INVALID_ARGUMENT naming the type.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromDir(const std::string& dir);
  // The same from in-memory JSON texts (`tokenizer_config_json` may be empty).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(std::string_view tokenizer_json,
                                                             std::string_view tokenizer_config_json);

  // Encodes UTF-8 text. Invalid UTF-8 is INVALID_ARGUMENT (with the byte offset). With
  // `add_special_tokens`, the post-processor's template applies (e.g. BOS first).
  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                                      bool add_special_tokens) const = 0;
  // Decodes ids to text exactly as HF `decode` does (skip_special_tokens as given,
  // clean_up_tokenization_spaces from tokenizer_config). Out-of-range ids are INVALID_ARGUMENT.
  // Byte sequences that are not valid UTF-8 become U+FFFD, as in HF.
  virtual absl::StatusOr<std::string> Decode(std::span<const int32_t> ids,
                                             bool skip_special_tokens) const = 0;

  // Decode without HF's clean_up_tokenization_spaces pass, and whether Decode applies it: the
  // IncrementalDetokenizer streams that pass itself, since it can join text across tokens.
  virtual absl::StatusOr<std::string> DecodeWithoutCleanUp(std::span<const int32_t> ids,
                                                           bool skip_special_tokens) const {
    return Decode(ids, skip_special_tokens);
  }
  virtual bool clean_up_tokenization_spaces() const { return false; }

  virtual int32_t vocab_size() const = 0;  // highest id + 1, added tokens included
  virtual bool IsSpecial(int32_t id) const = 0;
  virtual std::optional<int32_t> TokenToId(std::string_view token) const = 0;
  virtual std::optional<int32_t> bos_token_id() const = 0;
  virtual std::optional<int32_t> eos_token_id() const = 0;
};

// Streams text for generated ids without ever emitting a broken UTF-8 sequence: text whose last
// character is incomplete (or U+FFFD from a partial byte sequence) is held back until it
// completes. Uses a sliding window of previous ids so that decoders with context (SentencePiece
// leading-space stripping) produce the same text as decoding the whole sequence at once.
class IncrementalDetokenizer {
 public:
  // `prompt_ids` (may be empty) provide the left context; their text is not emitted.
  IncrementalDetokenizer(const Tokenizer& tokenizer, std::span<const int32_t> prompt_ids,
                         bool skip_special_tokens);
  // Appends one id; returns the newly completed text (possibly empty).
  std::string Push(int32_t id);
  // Returns whatever is held back (an incomplete tail becomes U+FFFD, as a full decode would).
  std::string Flush();

 private:
  // Decodes the window and emits what completed (everything when `force`).
  std::string Advance(bool force);
  // Applies the tokenizer's clean-up pass to the stream, holding back what it could still change.
  std::string EmitCleaned(std::string text, bool flush);

  const Tokenizer& tokenizer_;
  bool skip_special_;
  std::vector<int32_t> ids_;
  size_t prefix_offset_ = 0;
  size_t read_offset_ = 0;
  std::string pending_;  // emitted-but-not-yet-cleaned text (clean-up tokenizers only)
};

// Offset of the first byte of `text` that is not well-formed UTF-8 (overlong forms, surrogates,
// code points above U+10FFFF and truncated sequences are ill-formed), or nullopt.
std::optional<size_t> FindInvalidUtf8(std::string_view text);

}  // namespace tandem
