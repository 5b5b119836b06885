// Normalizers, pre-tokenizers, decoders and post-processors of tokenizer.json.
#include "engine/internal/tokenizer_pipeline.h"

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "engine/internal/tokenizer_bpe.h"
#include "engine/internal/tokenizer_text.h"

namespace tandem::internal {
namespace {

using nlohmann::json;

// The "type" of a stage, checked to be an object with a string type.
absl::StatusOr<std::string> StageType(const json& stage, std::string_view kind) {
  if (!stage.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(AsAbsl(kind), " must be an object"));
  }
  const auto type = stage.find("type");
  if (type == stage.end() || !type->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(AsAbsl(kind), " has no type"));
  }
  return type->get<std::string>();
}

absl::Status Unsupported(std::string_view kind, std::string_view type) {
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported ", AsAbsl(kind), " type '", AsAbsl(type), "'"));
}

absl::StatusOr<std::string> StringField(const json& object, const char* key,
                                        std::string_view where) {
  const auto it = object.find(key);
  if (it == object.end() || !it->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(AsAbsl(where), ": field '", key, "' must be a string"));
  }
  return it->get<std::string>();
}

// Optional boolean with a default.
absl::StatusOr<bool> BoolField(const json& object, const char* key, bool fallback,
                               std::string_view where) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) {
    return fallback;
  }
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(
        absl::StrCat(AsAbsl(where), ": field '", key, "' must be a boolean"));
  }
  return it->get<bool>();
}

absl::StatusOr<const json*> ArrayField(const json& object, const char* key,
                                       std::string_view where) {
  const auto it = object.find(key);
  if (it == object.end() || !it->is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat(AsAbsl(where), ": field '", key, "' must be an array"));
  }
  return &*it;
}

// ---------------------------------------------------------------------------------------------
// Normalizers

class SequenceNormalizer final : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> steps)
      : steps_(std::move(steps)) {}
  absl::Status Normalize(std::string* text) const override {
    for (const auto& step : steps_) {
      if (absl::Status status = step->Normalize(text); !status.ok()) {
        return status;
      }
    }
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> steps_;
};

class PrependNormalizer final : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  absl::Status Normalize(std::string* text) const override {
    // HF leaves empty segments empty.
    if (!text->empty()) {
      text->insert(0, prefix_);
    }
    return absl::OkStatus();
  }

 private:
  std::string prefix_;
};

class ReplaceNormalizer final : public Normalizer {
 public:
  ReplaceNormalizer(TextPattern pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  absl::Status Normalize(std::string* text) const override {
    return pattern_.ReplaceAll(content_, text);
  }

 private:
  TextPattern pattern_;
  std::string content_;
};

class UnicodeNormalizer final : public Normalizer {
 public:
  explicit UnicodeNormalizer(NormalizationForm form) : form_(form) {}
  absl::Status Normalize(std::string* text) const override { return NormalizeUnicode(form_, text); }

 private:
  NormalizationForm form_;
};

class LowercaseNormalizer final : public Normalizer {
 public:
  absl::Status Normalize(std::string* text) const override { return LowercaseUnicode(text); }
};

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers

class SequencePreTokenizer final : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> steps)
      : steps_(std::move(steps)) {}
  absl::Status PreTokenize(std::vector<std::string>* pieces) const override {
    for (const auto& step : steps_) {
      if (absl::Status status = step->PreTokenize(pieces); !status.ok()) {
        return status;
      }
    }
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> steps_;
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// Splits `piece` around the matches of `pattern` the way HF's NormalizedString::split does and
// appends the non-empty parts to `out`.
absl::Status SplitPiece(const TextPattern& pattern, SplitBehavior behavior, bool invert,
                        std::string_view piece, std::vector<std::string>* out) {
  std::vector<std::pair<size_t, size_t>> matches;
  if (absl::Status status = pattern.FindAll(piece, &matches); !status.ok()) {
    return status;
  }
  struct Segment {
    size_t begin;
    size_t end;
    bool is_match;
  };
  std::vector<Segment> segments;
  segments.reserve(matches.size() * 2 + 1);
  size_t pos = 0;
  for (const auto& [begin, end] : matches) {
    if (begin > pos) {
      segments.push_back({pos, begin, invert});
    }
    segments.push_back({begin, end, !invert});
    pos = end;
  }
  if (pos < piece.size()) {
    segments.push_back({pos, piece.size(), invert});
  }

  std::vector<std::pair<size_t, size_t>> parts;
  parts.reserve(segments.size());
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::kRemoved:
      for (const Segment& s : segments) {
        if (!s.is_match) {
          parts.emplace_back(s.begin, s.end);
        }
      }
      break;
    case SplitBehavior::kIsolated:
      for (const Segment& s : segments) {
        parts.emplace_back(s.begin, s.end);
      }
      break;
    case SplitBehavior::kMergedWithPrevious:
      for (const Segment& s : segments) {
        if (s.is_match && !previous_match && !parts.empty()) {
          parts.back().second = s.end;
        } else {
          parts.emplace_back(s.begin, s.end);
        }
        previous_match = s.is_match;
      }
      break;
    case SplitBehavior::kMergedWithNext:
      for (auto s = segments.rbegin(); s != segments.rend(); ++s) {
        if (s->is_match && !previous_match && !parts.empty()) {
          parts.back().first = s->begin;
        } else {
          parts.emplace_back(s->begin, s->end);
        }
        previous_match = s->is_match;
      }
      std::reverse(parts.begin(), parts.end());
      break;
    case SplitBehavior::kContiguous:
      for (size_t i = 0; i < segments.size(); ++i) {
        const Segment& s = segments[i];
        if (i > 0 && s.is_match == previous_match) {
          parts.back().second = s.end;
        } else {
          parts.emplace_back(s.begin, s.end);
        }
        previous_match = s.is_match;
      }
      break;
  }
  for (const auto& [begin, end] : parts) {
    if (end > begin) {
      out->emplace_back(piece.substr(begin, end - begin));
    }
  }
  return absl::OkStatus();
}

class SplitPreTokenizer final : public PreTokenizer {
 public:
  SplitPreTokenizer(TextPattern pattern, SplitBehavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  absl::Status PreTokenize(std::vector<std::string>* pieces) const override {
    std::vector<std::string> out;
    out.reserve(pieces->size());
    for (const std::string& piece : *pieces) {
      if (absl::Status status = SplitPiece(pattern_, behavior_, invert_, piece, &out);
          !status.ok()) {
        return status;
      }
    }
    *pieces = std::move(out);
    return absl::OkStatus();
  }

 private:
  TextPattern pattern_;
  SplitBehavior behavior_;
  bool invert_;
};

// GPT-2's split, used by ByteLevel when use_regex is set.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, std::optional<TextPattern> split)
      : add_prefix_space_(add_prefix_space), split_(std::move(split)) {}
  absl::Status PreTokenize(std::vector<std::string>* pieces) const override {
    std::vector<std::string> split;
    split.reserve(pieces->size());
    std::string prefixed;
    for (std::string& piece : *pieces) {
      if (add_prefix_space_ && !piece.starts_with(' ')) {
        piece.insert(0, " ");
      }
      if (split_.has_value()) {
        if (absl::Status status =
                SplitPiece(*split_, SplitBehavior::kIsolated, /*invert=*/false, piece, &split);
            !status.ok()) {
          return status;
        }
      } else {
        split.push_back(std::move(piece));
      }
    }
    const ByteLevelAlphabet& alphabet = ByteLevelAlphabet::Get();
    pieces->clear();
    for (const std::string& piece : split) {
      std::string mapped;
      mapped.reserve(piece.size() * 2);
      alphabet.EncodeAppend(piece, &mapped);
      pieces->push_back(std::move(mapped));
    }
    return absl::OkStatus();
  }

 private:
  bool add_prefix_space_;
  std::optional<TextPattern> split_;
};

// ---------------------------------------------------------------------------------------------
// Decoders

class SequenceDecoder final : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> steps)
      : steps_(std::move(steps)) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (const auto& step : steps_) {
      step->DecodeChain(tokens);
    }
  }

 private:
  std::vector<std::unique_ptr<Decoder>> steps_;
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(TextPattern pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (std::string& token : *tokens) {
      // Tokens come from the vocabulary and are valid UTF-8; a regex resource-limit failure
      // leaves the token as it is rather than failing the whole decode.
      (void)pattern_.ReplaceAll(content_, &token);
    }
  }

 private:
  TextPattern pattern_;
  std::string content_;
};

// <0xNN> tokens become their bytes; a run that is not valid UTF-8 becomes one U+FFFD per byte,
// as HF's ByteFallback does.
class ByteFallbackDecoder final : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens->size());
    std::string bytes;
    const auto flush = [&] {
      if (bytes.empty()) {
        return;
      }
      if (!FindInvalidUtf8(bytes).has_value()) {
        out.push_back(bytes);
      } else {
        for (size_t i = 0; i < bytes.size(); ++i) {
          out.emplace_back(kReplacementChar);
        }
      }
      bytes.clear();
    };
    for (std::string& token : *tokens) {
      if (const int byte = ParseByteToken(token); byte >= 0) {
        bytes.push_back(static_cast<char>(byte));
        continue;
      }
      flush();
      out.push_back(std::move(token));
    }
    flush();
    *tokens = std::move(out);
  }

 private:
  static int HexDigit(char c) {
    if (c >= '0' && c <= '9') {
      return c - '0';
    }
    if (c >= 'A' && c <= 'F') {
      return c - 'A' + 10;
    }
    if (c >= 'a' && c <= 'f') {
      return c - 'a' + 10;
    }
    return -1;
  }
  static int ParseByteToken(std::string_view token) {
    if (token.size() != 6 || !token.starts_with("<0x") || token[5] != '>') {
      return -1;
    }
    const int hi = HexDigit(token[3]);
    const int lo = HexDigit(token[4]);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
  }
};

class FuseDecoder final : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::string fused;
    for (const std::string& token : *tokens) {
      fused.append(token);
    }
    tokens->assign(1, std::move(fused));
  }
};

// Removes up to `start` leading and `stop` trailing copies of one character from each token.
class StripDecoder final : public Decoder {
 public:
  StripDecoder(std::string content, size_t start, size_t stop)
      : content_(std::move(content)), start_(start), stop_(stop) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    if (content_.empty()) {
      return;
    }
    for (std::string& token : *tokens) {
      std::string_view view = token;
      for (size_t i = 0; i < start_ && view.starts_with(content_); ++i) {
        view.remove_prefix(content_.size());
      }
      for (size_t i = 0; i < stop_ && view.ends_with(content_); ++i) {
        view.remove_suffix(content_.size());
      }
      token = std::string(view);
    }
  }

 private:
  std::string content_;  // one character
  size_t start_;
  size_t stop_;
};

// Maps alphabet code points back to bytes and decodes them as UTF-8 (lossily). A token with a
// character outside the alphabet (an added token, typically) contributes its own UTF-8 bytes.
class ByteLevelDecoder final : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    const ByteLevelAlphabet& alphabet = ByteLevelAlphabet::Get();
    std::string bytes;
    for (const std::string& token : *tokens) {
      if (!alphabet.DecodeAppend(token, &bytes)) {
        bytes.append(token);
      }
    }
    tokens->assign(1, DecodeUtf8Lossy(bytes));
  }
};

// ---------------------------------------------------------------------------------------------
// Post-processors

absl::StatusOr<std::vector<int32_t>> ParseIds(const json& ids, std::string_view where) {
  if (!ids.is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(AsAbsl(where), ": ids must be an array"));
  }
  std::vector<int32_t> out;
  for (const json& id : ids) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
        id.get<int64_t>() > BpeModel::kMaxTokenId) {
      return absl::InvalidArgumentError(absl::StrCat(AsAbsl(where), ": bad id ", id.dump()));
    }
    out.push_back(static_cast<int32_t>(id.get<int64_t>()));
  }
  return out;
}

absl::StatusOr<PostProcessor::Template> ParseTemplateProcessing(const json& processor) {
  constexpr std::string_view kWhere = "TemplateProcessing";
  const absl::StatusOr<const json*> single = ArrayField(processor, "single", kWhere);
  if (!single.ok()) {
    return single.status();
  }
  const auto special = processor.find("special_tokens");
  if (special != processor.end() && !special->is_object()) {
    return absl::InvalidArgumentError("TemplateProcessing: special_tokens must be an object");
  }
  PostProcessor::Template result;
  for (const json& piece : **single) {
    if (!piece.is_object() || piece.size() != 1) {
      return absl::InvalidArgumentError("TemplateProcessing: bad template piece");
    }
    const auto only = piece.begin();
    const std::string& kind = only.key();
    const json& body = only.value();
    if (!body.is_object()) {
      return absl::InvalidArgumentError("TemplateProcessing: bad template piece");
    }
    const absl::StatusOr<std::string> name = StringField(body, "id", kWhere);
    if (!name.ok()) {
      return name.status();
    }
    if (kind == "Sequence") {
      if (*name != "A") {
        return absl::InvalidArgumentError(
            absl::StrCat("TemplateProcessing: single template uses sequence '", *name, "'"));
      }
      result.push_back({.is_sequence = true, .ids = {}});
    } else if (kind == "SpecialToken") {
      const json* entry = nullptr;
      if (special != processor.end()) {
        if (const auto it = special->find(*name); it != special->end()) {
          entry = &*it;
        }
      }
      if (entry == nullptr || !entry->is_object() || !entry->contains("ids")) {
        return absl::InvalidArgumentError(absl::StrCat("TemplateProcessing: special token '", *name,
                                                       "' is not in special_tokens"));
      }
      absl::StatusOr<std::vector<int32_t>> ids = ParseIds(entry->at("ids"), kWhere);
      if (!ids.ok()) {
        return ids.status();
      }
      result.push_back({.is_sequence = false, .ids = std::move(*ids)});
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("TemplateProcessing: unknown template piece '", kind, "'"));
    }
  }
  return result;
}

// Bert and Roberta wrap a single sequence as [cls] A [sep]; each token is ["text", id].
absl::StatusOr<PostProcessor::Template> ParseClsSep(const json& processor, std::string_view type) {
  PostProcessor::Template result;
  for (const char* key : {"cls", "sep"}) {
    const auto it = processor.find(key);
    if (it == processor.end() || !it->is_array() || it->size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(AsAbsl(type), ": field '", key, "' must be [token, id]"));
    }
    absl::StatusOr<std::vector<int32_t>> ids = ParseIds(json::array({(*it)[1]}), type);
    if (!ids.ok()) {
      return ids.status();
    }
    if (result.empty()) {
      result.push_back({.is_sequence = false, .ids = std::move(*ids)});
      result.push_back({.is_sequence = true, .ids = {}});
    } else {
      result.push_back({.is_sequence = false, .ids = std::move(*ids)});
    }
  }
  return result;
}

absl::Status AppendPostProcessor(const json& processor, PostProcessor* out) {
  constexpr std::string_view kKind = "post_processor";
  const absl::StatusOr<std::string> type = StageType(processor, kKind);
  if (!type.ok()) {
    return type.status();
  }
  if (*type == "ByteLevel") {
    return absl::OkStatus();  // offsets only
  }
  if (*type == "Sequence") {
    const absl::StatusOr<const json*> steps = ArrayField(processor, "processors", *type);
    if (!steps.ok()) {
      return steps.status();
    }
    for (const json& step : **steps) {
      if (absl::Status status = AppendPostProcessor(step, out); !status.ok()) {
        return status;
      }
    }
    return absl::OkStatus();
  }
  absl::StatusOr<PostProcessor::Template> result;
  if (*type == "TemplateProcessing") {
    result = ParseTemplateProcessing(processor);
  } else if (*type == "BertProcessing" || *type == "RobertaProcessing") {
    result = ParseClsSep(processor, *type);
  } else {
    return Unsupported(kKind, *type);
  }
  if (!result.ok()) {
    return result.status();
  }
  out->templates().push_back(std::move(*result));
  return absl::OkStatus();
}

absl::StatusOr<SplitBehavior> ParseSplitBehavior(const json& split) {
  const absl::StatusOr<std::string> name = StringField(split, "behavior", "Split");
  if (!name.ok()) {
    return name.status();
  }
  if (*name == "Removed") {
    return SplitBehavior::kRemoved;
  }
  if (*name == "Isolated") {
    return SplitBehavior::kIsolated;
  }
  if (*name == "MergedWithPrevious") {
    return SplitBehavior::kMergedWithPrevious;
  }
  if (*name == "MergedWithNext") {
    return SplitBehavior::kMergedWithNext;
  }
  if (*name == "Contiguous") {
    return SplitBehavior::kContiguous;
  }
  return absl::InvalidArgumentError(absl::StrCat("unsupported Split behavior '", *name, "'"));
}

// The {"pattern": ..., "content": ...} pair of Replace stages.
absl::StatusOr<std::pair<TextPattern, std::string>> ParseReplace(const json& stage) {
  const auto pattern_json = stage.find("pattern");
  if (pattern_json == stage.end()) {
    return absl::InvalidArgumentError("Replace: missing pattern");
  }
  absl::StatusOr<TextPattern> pattern = TextPattern::FromJson(*pattern_json);
  if (!pattern.ok()) {
    return pattern.status();
  }
  absl::StatusOr<std::string> content = StringField(stage, "content", "Replace");
  if (!content.ok()) {
    return content.status();
  }
  return std::pair{std::move(*pattern), std::move(*content)};
}

// Parses the elements of `array_key` with `parse`, for Sequence stages.
template <typename Stage, typename Parse>
absl::StatusOr<std::vector<std::unique_ptr<Stage>>> ParseSteps(const json& stage,
                                                               const char* array_key, Parse parse) {
  const absl::StatusOr<const json*> steps = ArrayField(stage, array_key, "Sequence");
  if (!steps.ok()) {
    return steps.status();
  }
  std::vector<std::unique_ptr<Stage>> out;
  for (const json& step : **steps) {
    absl::StatusOr<std::unique_ptr<Stage>> parsed = parse(step);
    if (!parsed.ok()) {
      return parsed.status();
    }
    if (*parsed != nullptr) {
      out.push_back(std::move(*parsed));
    }
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

absl::StatusOr<TextPattern> TextPattern::FromJson(const json& pattern) {
  TextPattern result;
  if (pattern.is_object() && pattern.size() == 1) {
    if (const auto it = pattern.find("String"); it != pattern.end() && it->is_string()) {
      result.literal_ = it->get<std::string>();
      if (result.literal_.empty()) {
        return absl::InvalidArgumentError("pattern: empty String pattern");
      }
      if (absl::Status status = ValidateUtf8(result.literal_); !status.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("pattern: ", status.message()));
      }
      return result;
    }
    if (const auto it = pattern.find("Regex"); it != pattern.end() && it->is_string()) {
      absl::StatusOr<std::unique_ptr<TokenizerRegex>> regex =
          TokenizerRegex::Compile(it->get_ref<const std::string&>());
      if (!regex.ok()) {
        return regex.status();
      }
      result.regex_ = std::move(*regex);
      return result;
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "pattern must be {\"String\": ...} or {\"Regex\": ...}, got ", pattern.dump().substr(0, 80)));
}

absl::Status TextPattern::FindAll(std::string_view text,
                                  std::vector<std::pair<size_t, size_t>>* matches) const {
  if (regex_ != nullptr) {
    return regex_->FindAll(text, matches);
  }
  size_t pos = 0;
  while (true) {
    const size_t hit = text.find(literal_, pos);
    if (hit == std::string_view::npos) {
      break;
    }
    matches->emplace_back(hit, hit + literal_.size());
    pos = hit + literal_.size();
  }
  return absl::OkStatus();
}

absl::Status TextPattern::ReplaceAll(std::string_view content, std::string* text) const {
  std::vector<std::pair<size_t, size_t>> matches;
  if (absl::Status status = FindAll(*text, &matches); !status.ok()) {
    return status;
  }
  if (matches.empty()) {
    return absl::OkStatus();
  }
  std::string out;
  out.reserve(text->size());
  size_t pos = 0;
  for (const auto& [begin, end] : matches) {
    out.append(*text, pos, begin - pos);
    out.append(content);
    pos = end;
  }
  out.append(*text, pos, std::string::npos);
  *text = std::move(out);
  return absl::OkStatus();
}

void PostProcessor::Apply(std::vector<int32_t>* ids) const {
  for (const Template& pieces : templates_) {
    std::vector<int32_t> out;
    out.reserve(ids->size() + 4);
    for (const Item& item : pieces) {
      if (item.is_sequence) {
        out.insert(out.end(), ids->begin(), ids->end());
      } else {
        out.insert(out.end(), item.ids.begin(), item.ids.end());
      }
    }
    *ids = std::move(out);
  }
}

absl::StatusOr<std::unique_ptr<Normalizer>> ParseNormalizer(const json& stage) {
  constexpr std::string_view kKind = "normalizer";
  if (stage.is_null()) {
    return nullptr;
  }
  const absl::StatusOr<std::string> type = StageType(stage, kKind);
  if (!type.ok()) {
    return type.status();
  }
  if (*type == "Sequence") {
    auto steps = ParseSteps<Normalizer>(stage, "normalizers", ParseNormalizer);
    if (!steps.ok()) {
      return steps.status();
    }
    return std::make_unique<SequenceNormalizer>(std::move(*steps));
  }
  if (*type == "Prepend") {
    absl::StatusOr<std::string> prefix = StringField(stage, "prepend", *type);
    if (!prefix.ok()) {
      return prefix.status();
    }
    return std::make_unique<PrependNormalizer>(std::move(*prefix));
  }
  if (*type == "Replace") {
    auto replace = ParseReplace(stage);
    if (!replace.ok()) {
      return replace.status();
    }
    return std::make_unique<ReplaceNormalizer>(std::move(replace->first),
                                               std::move(replace->second));
  }
  if (*type == "NFC") {
    return std::make_unique<UnicodeNormalizer>(NormalizationForm::kNfc);
  }
  if (*type == "NFD") {
    return std::make_unique<UnicodeNormalizer>(NormalizationForm::kNfd);
  }
  if (*type == "NFKC") {
    return std::make_unique<UnicodeNormalizer>(NormalizationForm::kNfkc);
  }
  if (*type == "NFKD") {
    return std::make_unique<UnicodeNormalizer>(NormalizationForm::kNfkd);
  }
  if (*type == "Lowercase") {
    return std::make_unique<LowercaseNormalizer>();
  }
  return Unsupported(kKind, *type);
}

absl::StatusOr<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const json& stage) {
  constexpr std::string_view kKind = "pre_tokenizer";
  if (stage.is_null()) {
    return nullptr;
  }
  const absl::StatusOr<std::string> type = StageType(stage, kKind);
  if (!type.ok()) {
    return type.status();
  }
  if (*type == "Sequence") {
    auto steps = ParseSteps<PreTokenizer>(stage, "pretokenizers", ParsePreTokenizer);
    if (!steps.ok()) {
      return steps.status();
    }
    return std::make_unique<SequencePreTokenizer>(std::move(*steps));
  }
  if (*type == "Split") {
    const auto pattern_json = stage.find("pattern");
    if (pattern_json == stage.end()) {
      return absl::InvalidArgumentError("Split: missing pattern");
    }
    absl::StatusOr<TextPattern> pattern = TextPattern::FromJson(*pattern_json);
    if (!pattern.ok()) {
      return pattern.status();
    }
    const absl::StatusOr<SplitBehavior> behavior = ParseSplitBehavior(stage);
    if (!behavior.ok()) {
      return behavior.status();
    }
    const absl::StatusOr<bool> invert = BoolField(stage, "invert", false, *type);
    if (!invert.ok()) {
      return invert.status();
    }
    return std::make_unique<SplitPreTokenizer>(std::move(*pattern), *behavior, *invert);
  }
  if (*type == "ByteLevel") {
    const absl::StatusOr<bool> add_prefix_space = BoolField(stage, "add_prefix_space", true, *type);
    if (!add_prefix_space.ok()) {
      return add_prefix_space.status();
    }
    const absl::StatusOr<bool> use_regex = BoolField(stage, "use_regex", true, *type);
    if (!use_regex.ok()) {
      return use_regex.status();
    }
    std::optional<TextPattern> split;
    if (*use_regex) {
      absl::StatusOr<TextPattern> gpt2 =
          TextPattern::FromJson(json{{"Regex", std::string(kGpt2Pattern)}});
      if (!gpt2.ok()) {
        return gpt2.status();
      }
      split = std::move(*gpt2);
    }
    return std::make_unique<ByteLevelPreTokenizer>(*add_prefix_space, std::move(split));
  }
  return Unsupported(kKind, *type);
}

absl::StatusOr<std::unique_ptr<Decoder>> ParseDecoder(const json& stage) {
  constexpr std::string_view kKind = "decoder";
  if (stage.is_null()) {
    return nullptr;
  }
  const absl::StatusOr<std::string> type = StageType(stage, kKind);
  if (!type.ok()) {
    return type.status();
  }
  if (*type == "Sequence") {
    auto steps = ParseSteps<Decoder>(stage, "decoders", ParseDecoder);
    if (!steps.ok()) {
      return steps.status();
    }
    return std::make_unique<SequenceDecoder>(std::move(*steps));
  }
  if (*type == "Replace") {
    auto replace = ParseReplace(stage);
    if (!replace.ok()) {
      return replace.status();
    }
    return std::make_unique<ReplaceDecoder>(std::move(replace->first), std::move(replace->second));
  }
  if (*type == "ByteFallback") {
    return std::make_unique<ByteFallbackDecoder>();
  }
  if (*type == "Fuse") {
    return std::make_unique<FuseDecoder>();
  }
  if (*type == "Strip") {
    absl::StatusOr<std::string> content = StringField(stage, "content", *type);
    if (!content.ok()) {
      return content.status();
    }
    if (content->empty() ||
        Utf8SequenceLength(static_cast<unsigned char>((*content)[0])) != content->size()) {
      return absl::InvalidArgumentError("Strip: content must be one character");
    }
    size_t counts[2] = {0, 0};
    const char* keys[2] = {"start", "stop"};
    for (int i = 0; i < 2; ++i) {
      const auto it = stage.find(keys[i]);
      if (it == stage.end() || !it->is_number_unsigned()) {
        return absl::InvalidArgumentError(
            absl::StrCat("Strip: field '", keys[i], "' must be a non-negative integer"));
      }
      counts[i] = it->get<size_t>();
    }
    return std::make_unique<StripDecoder>(std::move(*content), counts[0], counts[1]);
  }
  if (*type == "ByteLevel") {
    return std::make_unique<ByteLevelDecoder>();
  }
  return Unsupported(kKind, *type);
}

absl::StatusOr<PostProcessor> ParsePostProcessor(const json& stage) {
  PostProcessor result;
  if (stage.is_null()) {
    return result;
  }
  if (absl::Status status = AppendPostProcessor(stage, &result); !status.ok()) {
    return status;
  }
  return result;
}

}  // namespace tandem::internal
