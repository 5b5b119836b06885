// The configurable stages of a Hugging Face tokenizer.json around the BPE model: normalizers,
// pre-tokenizers, decoders and the post-processor, parsed from their JSON descriptions. Only the
// types that released BPE tokenizers use are implemented; any other type is refused by name.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/internal/tokenizer_regex.h"

namespace tandem::internal {

// A `pattern` object of tokenizer.json: {"String": literal} or {"Regex": pattern}.
class TextPattern {
 public:
  static absl::StatusOr<TextPattern> FromJson(const nlohmann::json& pattern);
  // Appends the [begin, end) ranges of the non-overlapping matches in valid UTF-8 `text`.
  absl::Status FindAll(std::string_view text,
                       std::vector<std::pair<size_t, size_t>>* matches) const;
  // Replaces every match with `content`.
  absl::Status ReplaceAll(std::string_view content, std::string* text) const;

 private:
  std::string literal_;
  std::shared_ptr<const TokenizerRegex> regex_;  // set for {"Regex": ...}; shared by copies
};

// Rewrites a whole text segment (the parts of the input between added tokens).
class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual absl::Status Normalize(std::string* text) const = 0;
};

// Splits pieces into smaller pieces; may rewrite them (ByteLevel maps bytes to its alphabet).
class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  virtual absl::Status PreTokenize(std::vector<std::string>* pieces) const = 0;
};

// One step of HF's decoder chain: rewrites the list of token strings.
class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void DecodeChain(std::vector<std::string>* tokens) const = 0;
};

// The part of a post-processor that changes ids: a list of templates for a single sequence,
// applied in order (ByteLevel post-processing only adjusts offsets, which we do not track).
class PostProcessor {
 public:
  struct Item {
    bool is_sequence = false;  // the encoded text itself ("$A")
    std::vector<int32_t> ids;  // otherwise: the special token's ids
  };
  using Template = std::vector<Item>;

  // Wraps `ids` as the templates say.
  void Apply(std::vector<int32_t>* ids) const;
  std::vector<Template>& templates() { return templates_; }
  const std::vector<Template>& templates() const { return templates_; }

 private:
  std::vector<Template> templates_;
};

// Each parser accepts JSON null as "no stage" (nullptr, or a PostProcessor without templates).
absl::StatusOr<std::unique_ptr<Normalizer>> ParseNormalizer(const nlohmann::json& json);
absl::StatusOr<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const nlohmann::json& json);
absl::StatusOr<std::unique_ptr<Decoder>> ParseDecoder(const nlohmann::json& json);
absl::StatusOr<PostProcessor> ParsePostProcessor(const nlohmann::json& json);

}  // namespace tandem::internal
