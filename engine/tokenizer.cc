// Hugging Face tokenizer.json BPE tokenizers: the encode/decode pipeline around the BPE model,
// added-token splitting, tokenizer_config.json handling, and streaming detokenization.
#include "engine/tokenizer.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/internal/tokenizer_bpe.h"
#include "engine/internal/tokenizer_pipeline.h"
#include "engine/internal/tokenizer_text.h"

namespace tandem {
namespace {

using internal::AsAbsl;
using nlohmann::json;

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
  bool single_word = false;
};

// Finds added tokens in text, leftmost first and longest among those starting at one position
// (HF's Aho-Corasick "leftmost longest"), over a byte trie of their contents.
class AddedTokenMatcher {
 public:
  struct Match {
    size_t begin;
    size_t end;
    int32_t token;  // index into the tokenizer's added tokens
  };

  AddedTokenMatcher() : nodes_(1) {}

  void Add(std::string_view content, int32_t token) {
    size_t node = 0;
    for (const char c : content) {
      const auto byte = static_cast<unsigned char>(c);
      int32_t child = -1;
      for (const auto& [edge, target] : nodes_[node].children) {
        if (edge == byte) {
          child = target;
          break;
        }
      }
      if (child < 0) {
        child = static_cast<int32_t>(nodes_.size());
        nodes_[node].children.emplace_back(byte, child);
        nodes_.emplace_back();
      }
      node = static_cast<size_t>(child);
    }
    nodes_[node].token = token;
    first_byte_[static_cast<unsigned char>(content[0])] = true;
    empty_ = false;
  }

  bool empty() const { return empty_; }

  // The first match that starts at or after `from` and for which `accept` holds.
  template <typename Accept>
  std::optional<Match> FindNext(std::string_view text, size_t from, Accept accept) const {
    for (size_t begin = from; begin < text.size(); ++begin) {
      if (!first_byte_[static_cast<unsigned char>(text[begin])]) {
        continue;
      }
      std::optional<Match> best;
      size_t node = 0;
      for (size_t i = begin; i < text.size(); ++i) {
        const auto byte = static_cast<unsigned char>(text[i]);
        int32_t child = -1;
        for (const auto& [edge, target] : nodes_[node].children) {
          if (edge == byte) {
            child = target;
            break;
          }
        }
        if (child < 0) {
          break;
        }
        node = static_cast<size_t>(child);
        if (nodes_[node].token >= 0 && accept(begin, i + 1, nodes_[node].token)) {
          best = Match{begin, i + 1, nodes_[node].token};
        }
      }
      if (best.has_value()) {
        return best;
      }
    }
    return std::nullopt;
  }

 private:
  struct Node {
    std::vector<std::pair<uint8_t, int32_t>> children;
    int32_t token = -1;
  };
  std::vector<Node> nodes_;
  std::array<bool, 256> first_byte_{};
  bool empty_ = true;
};

bool IsAsciiSpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

bool IsWordByte(char c) {
  const auto b = static_cast<unsigned char>(c);
  return b >= 0x80 || (b >= '0' && b <= '9') || (b >= 'a' && b <= 'z') || (b >= 'A' && b <= 'Z') ||
         b == '_';
}

// A part of the input: either text still to tokenize, or an added token already recognised.
struct Segment {
  std::string text;
  int32_t token_id = -1;
};

absl::StatusOr<json> ParseJson(std::string_view text, std::string_view name) {
  json root = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(AsAbsl(name), " is not valid JSON"));
  }
  return root;
}

// bos_token/eos_token in tokenizer_config.json: a string, {"content": ...} or null.
std::optional<std::string> ConfigTokenName(const json& config, const char* key) {
  const auto it = config.find(key);
  if (it == config.end()) {
    return std::nullopt;
  }
  if (it->is_string()) {
    return it->get<std::string>();
  }
  if (it->is_object()) {
    const auto content = it->find("content");
    if (content != it->end() && content->is_string()) {
      return content->get<std::string>();
    }
  }
  return std::nullopt;
}

absl::StatusOr<std::string> ReadFile(const std::string& path, bool* found) {
  std::ifstream file(path, std::ios::binary);
  *found = file.is_open();
  if (!*found) {
    return std::string();
  }
  std::ostringstream contents;
  contents << file.rdbuf();
  if (file.bad()) {
    return absl::DataLossError(absl::StrCat("cannot read ", path));
  }
  return std::move(contents).str();
}

class HfTokenizer final : public Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<HfTokenizer>> Load(std::string_view tokenizer_json,
                                                           std::string_view config_json);

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              bool add_special_tokens) const override;
  absl::StatusOr<std::string> Decode(std::span<const int32_t> ids,
                                     bool skip_special_tokens) const override {
    return DecodeImpl(ids, skip_special_tokens, clean_up_spaces_);
  }
  absl::StatusOr<std::string> DecodeWithoutCleanUp(std::span<const int32_t> ids,
                                                   bool skip_special_tokens) const override {
    return DecodeImpl(ids, skip_special_tokens, /*clean_up=*/false);
  }
  bool clean_up_tokenization_spaces() const override { return clean_up_spaces_; }

  int32_t vocab_size() const override { return static_cast<int32_t>(tokens_.size()); }
  bool IsSpecial(int32_t id) const override { return id >= 0 && id < vocab_size() && special_[id]; }
  std::optional<int32_t> TokenToId(std::string_view token) const override;
  std::optional<int32_t> bos_token_id() const override { return bos_id_; }
  std::optional<int32_t> eos_token_id() const override { return eos_id_; }

 private:
  HfTokenizer() = default;
  absl::Status LoadTokenizerJson(const json& root);
  absl::Status LoadAddedTokens(const json& added);
  absl::Status LoadConfig(const json& config);
  absl::Status BuildIdTables();
  void ApplyAddBosEos(std::optional<bool> add_bos, std::optional<bool> add_eos);

  // Splits `text` around the added tokens that `matcher` finds, honouring lstrip/rstrip and
  // single_word, and appends the parts to `out`.
  void SplitOnAddedTokens(const AddedTokenMatcher& matcher, std::string_view text,
                          std::vector<Segment>* out) const;
  absl::Status EncodeSegment(std::string text, std::vector<int32_t>* ids) const;
  absl::StatusOr<std::string> DecodeImpl(std::span<const int32_t> ids, bool skip_special_tokens,
                                         bool clean_up) const;

  std::unique_ptr<internal::BpeModel> model_;
  std::unique_ptr<internal::Normalizer> normalizer_;
  std::unique_ptr<internal::PreTokenizer> pre_tokenizer_;
  std::unique_ptr<internal::Decoder> decoder_;
  internal::PostProcessor post_processor_;

  std::vector<AddedToken> added_;
  internal::TokenIdMap added_by_content_;
  AddedTokenMatcher raw_matcher_;         // added tokens matched in the raw input
  AddedTokenMatcher normalized_matcher_;  // added tokens matched after normalisation

  std::vector<std::string_view> tokens_;  // by id; added tokens take precedence
  std::vector<bool> special_;

  bool clean_up_spaces_ = false;
  std::optional<int32_t> bos_id_;
  std::optional<int32_t> eos_id_;
};

absl::StatusOr<std::unique_ptr<HfTokenizer>> HfTokenizer::Load(std::string_view tokenizer_json,
                                                               std::string_view config_json) {
  absl::StatusOr<json> root = ParseJson(tokenizer_json, "tokenizer.json");
  if (!root.ok()) {
    return root.status();
  }
  std::optional<json> config;
  if (!config_json.empty()) {
    absl::StatusOr<json> parsed = ParseJson(config_json, "tokenizer_config.json");
    if (!parsed.ok()) {
      return parsed.status();
    }
    config = std::move(*parsed);
  }
  auto tokenizer = std::unique_ptr<HfTokenizer>(new HfTokenizer());
  // nlohmann::json throws on type mismatches we did not check for; this is the boundary that
  // turns them into a status.
  try {
    if (absl::Status status = tokenizer->LoadTokenizerJson(*root); !status.ok()) {
      return status;
    }
    if (config.has_value()) {
      if (absl::Status status = tokenizer->LoadConfig(*config); !status.ok()) {
        return status;
      }
    }
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("malformed tokenizer files: ", e.what()));
  }
  return tokenizer;
}

absl::Status HfTokenizer::LoadTokenizerJson(const json& root) {
  if (!root.is_object()) {
    return absl::InvalidArgumentError("tokenizer.json must be a JSON object");
  }
  const auto model = root.find("model");
  if (model == root.end()) {
    return absl::InvalidArgumentError("tokenizer.json has no model");
  }
  absl::StatusOr<std::unique_ptr<internal::BpeModel>> bpe = internal::BpeModel::FromJson(*model);
  if (!bpe.ok()) {
    return bpe.status();
  }
  model_ = std::move(*bpe);

  const json null_stage;
  const auto stage = [&](const char* key) -> const json& {
    const auto it = root.find(key);
    return it == root.end() ? null_stage : *it;
  };
  absl::StatusOr<std::unique_ptr<internal::Normalizer>> normalizer =
      internal::ParseNormalizer(stage("normalizer"));
  if (!normalizer.ok()) {
    return normalizer.status();
  }
  normalizer_ = std::move(*normalizer);
  absl::StatusOr<std::unique_ptr<internal::PreTokenizer>> pre_tokenizer =
      internal::ParsePreTokenizer(stage("pre_tokenizer"));
  if (!pre_tokenizer.ok()) {
    return pre_tokenizer.status();
  }
  pre_tokenizer_ = std::move(*pre_tokenizer);
  absl::StatusOr<std::unique_ptr<internal::Decoder>> decoder =
      internal::ParseDecoder(stage("decoder"));
  if (!decoder.ok()) {
    return decoder.status();
  }
  decoder_ = std::move(*decoder);
  absl::StatusOr<internal::PostProcessor> post_processor =
      internal::ParsePostProcessor(stage("post_processor"));
  if (!post_processor.ok()) {
    return post_processor.status();
  }
  post_processor_ = std::move(*post_processor);

  if (const json& added = stage("added_tokens"); !added.is_null()) {
    if (absl::Status status = LoadAddedTokens(added); !status.ok()) {
      return status;
    }
  }
  return BuildIdTables();
}

absl::Status HfTokenizer::LoadAddedTokens(const json& added) {
  if (!added.is_array()) {
    return absl::InvalidArgumentError("tokenizer.json: added_tokens must be an array");
  }
  for (const json& entry : added) {
    if (!entry.is_object()) {
      return absl::InvalidArgumentError("tokenizer.json: added token must be an object");
    }
    const auto id = entry.find("id");
    const auto content = entry.find("content");
    if (id == entry.end() || !id->is_number_integer() || content == entry.end() ||
        !content->is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "added token needs an integer id and a string content: ", entry.dump().substr(0, 120)));
    }
    AddedToken token;
    const auto raw_id = id->get<int64_t>();
    token.content = content->get<std::string>();
    if (raw_id < 0 || raw_id > internal::BpeModel::kMaxTokenId) {
      return absl::InvalidArgumentError(
          absl::StrCat("added token '", token.content, "' has id ", raw_id, " out of range"));
    }
    token.id = static_cast<int32_t>(raw_id);
    if (token.content.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("added token ", token.id, " is empty"));
    }
    for (const auto& [key, flag] :
         {std::pair{"special", &token.special}, std::pair{"lstrip", &token.lstrip},
          std::pair{"rstrip", &token.rstrip}, std::pair{"normalized", &token.normalized},
          std::pair{"single_word", &token.single_word}}) {
      const auto it = entry.find(key);
      if (it == entry.end() || it->is_null()) {
        continue;
      }
      if (!it->is_boolean()) {
        return absl::InvalidArgumentError(
            absl::StrCat("added token '", token.content, "': '", key, "' must be a boolean"));
      }
      *flag = it->get<bool>();
    }
    if (const auto [it, inserted] = added_by_content_.emplace(token.content, token.id); !inserted) {
      return absl::InvalidArgumentError(
          absl::StrCat("added token '", token.content, "' is listed twice"));
    }
    added_.push_back(std::move(token));
  }
  // Contents matched after normalisation are normalised themselves, as HF does.
  for (size_t i = 0; i < added_.size(); ++i) {
    const AddedToken& token = added_[i];
    if (token.normalized && normalizer_ != nullptr) {
      std::string normalized = token.content;
      if (absl::Status status = normalizer_->Normalize(&normalized); !status.ok()) {
        return status;
      }
      if (!normalized.empty()) {
        normalized_matcher_.Add(normalized, static_cast<int32_t>(i));
      }
    } else {
      raw_matcher_.Add(token.content, static_cast<int32_t>(i));
    }
  }
  return absl::OkStatus();
}

absl::Status HfTokenizer::BuildIdTables() {
  int32_t limit = model_->id_limit();
  for (const AddedToken& token : added_) {
    limit = std::max(limit, token.id + 1);
  }
  // Released vocabularies are dense; a sparse id space only inflates the tables.
  const size_t count = model_->vocab_count() + added_.size();
  if (static_cast<size_t>(limit) > 2 * count + 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("token ids reach ", limit - 1, " but only ", count, " tokens are defined"));
  }
  tokens_.assign(limit, std::string_view());
  special_.assign(limit, false);
  std::vector<bool> defined(limit, false);
  for (int32_t id = 0; id < model_->id_limit(); ++id) {
    if (const std::string* token = model_->IdToToken(id)) {
      tokens_[id] = *token;
      defined[id] = true;
    }
  }
  std::vector<bool> added_seen(limit, false);
  for (const AddedToken& token : added_) {
    if (added_seen[token.id]) {
      return absl::InvalidArgumentError(
          absl::StrCat("added tokens share id ", token.id, " ('", token.content, "')"));
    }
    added_seen[token.id] = true;
    tokens_[token.id] = token.content;
    special_[token.id] = token.special;
    defined[token.id] = true;
  }
  for (const auto& pieces : post_processor_.templates()) {
    for (const auto& item : pieces) {
      for (const int32_t id : item.ids) {
        if (id >= limit || !defined[id]) {
          return absl::InvalidArgumentError(
              absl::StrCat("post_processor uses id ", id, ", which has no token"));
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::Status HfTokenizer::LoadConfig(const json& config) {
  if (!config.is_object()) {
    return absl::InvalidArgumentError("tokenizer_config.json must be a JSON object");
  }
  if (const auto it = config.find("clean_up_tokenization_spaces");
      it != config.end() && it->is_boolean()) {
    clean_up_spaces_ = it->get<bool>();
  }
  if (const auto name = ConfigTokenName(config, "bos_token")) {
    bos_id_ = TokenToId(*name);
  }
  if (const auto name = ConfigTokenName(config, "eos_token")) {
    eos_id_ = TokenToId(*name);
  }
  const auto flag = [&](const char* key) -> std::optional<bool> {
    const auto it = config.find(key);
    if (it == config.end() || !it->is_boolean()) {
      return std::nullopt;
    }
    return it->get<bool>();
  };
  ApplyAddBosEos(flag("add_bos_token"), flag("add_eos_token"));
  return absl::OkStatus();
}

// transformers' Llama-family tokenizers rebuild the template from add_bos_token/add_eos_token;
// we adjust the loaded template the same way: drop or add BOS first and EOS last.
void HfTokenizer::ApplyAddBosEos(std::optional<bool> add_bos, std::optional<bool> add_eos) {
  using Item = internal::PostProcessor::Item;
  auto& templates = post_processor_.templates();
  const auto is_token = [](const Item& item, std::optional<int32_t> id) {
    return id.has_value() && !item.is_sequence && item.ids.size() == 1 && item.ids[0] == *id;
  };
  if (add_bos.has_value() && bos_id_.has_value()) {
    const bool has = !templates.empty() && !templates.front().empty() &&
                     is_token(templates.front().front(), bos_id_);
    if (has && !*add_bos) {
      templates.front().erase(templates.front().begin());
    } else if (!has && *add_bos) {
      if (templates.empty()) {
        templates.push_back({Item{.is_sequence = true, .ids = {}}});
      }
      templates.front().insert(templates.front().begin(),
                               Item{.is_sequence = false, .ids = {*bos_id_}});
    }
  }
  if (add_eos.has_value() && eos_id_.has_value()) {
    const bool has = !templates.empty() && !templates.back().empty() &&
                     is_token(templates.back().back(), eos_id_);
    if (has && !*add_eos) {
      templates.back().pop_back();
    } else if (!has && *add_eos) {
      if (templates.empty()) {
        templates.push_back({Item{.is_sequence = true, .ids = {}}});
      }
      templates.back().push_back(Item{.is_sequence = false, .ids = {*eos_id_}});
    }
  }
}

std::optional<int32_t> HfTokenizer::TokenToId(std::string_view token) const {
  if (const auto it = added_by_content_.find(token); it != added_by_content_.end()) {
    return it->second;
  }
  return model_->TokenToId(token);
}

void HfTokenizer::SplitOnAddedTokens(const AddedTokenMatcher& matcher, std::string_view text,
                                     std::vector<Segment>* out) const {
  size_t pos = 0;
  const auto accept = [&](size_t begin, size_t end, int32_t index) {
    if (!added_[index].single_word) {
      return true;
    }
    return (begin == 0 || !IsWordByte(text[begin - 1])) &&
           (end == text.size() || !IsWordByte(text[end]));
  };
  while (pos < text.size()) {
    const std::optional<AddedTokenMatcher::Match> match = matcher.FindNext(text, pos, accept);
    if (!match.has_value()) {
      break;
    }
    const AddedToken& token = added_[match->token];
    size_t begin = match->begin;
    size_t end = match->end;
    // lstrip/rstrip: the token swallows the whitespace next to it.
    if (token.lstrip) {
      while (begin > pos && IsAsciiSpace(text[begin - 1])) {
        --begin;
      }
    }
    if (token.rstrip) {
      while (end < text.size() && IsAsciiSpace(text[end])) {
        ++end;
      }
    }
    if (begin > pos) {
      out->push_back({std::string(text.substr(pos, begin - pos)), -1});
    }
    out->push_back({std::string(), token.id});
    pos = end;
  }
  if (pos < text.size()) {
    out->push_back({std::string(text.substr(pos)), -1});
  }
}

absl::Status HfTokenizer::EncodeSegment(std::string text, std::vector<int32_t>* ids) const {
  if (normalizer_ != nullptr) {
    if (absl::Status status = normalizer_->Normalize(&text); !status.ok()) {
      return status;
    }
  }
  std::vector<Segment> parts;
  if (normalized_matcher_.empty()) {
    parts.push_back({std::move(text), -1});
  } else {
    SplitOnAddedTokens(normalized_matcher_, text, &parts);
  }
  for (Segment& part : parts) {
    if (part.token_id >= 0) {
      ids->push_back(part.token_id);
      continue;
    }
    std::vector<std::string> pieces;
    pieces.push_back(std::move(part.text));
    if (pre_tokenizer_ != nullptr) {
      if (absl::Status status = pre_tokenizer_->PreTokenize(&pieces); !status.ok()) {
        return status;
      }
    }
    for (const std::string& piece : pieces) {
      model_->Tokenize(piece, ids);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> HfTokenizer::Encode(std::string_view text,
                                                         bool add_special_tokens) const {
  if (absl::Status status = internal::ValidateUtf8(text); !status.ok()) {
    return status;
  }
  std::vector<Segment> segments;
  if (raw_matcher_.empty()) {
    segments.push_back({std::string(text), -1});
  } else {
    SplitOnAddedTokens(raw_matcher_, text, &segments);
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  for (Segment& segment : segments) {
    if (segment.token_id >= 0) {
      ids.push_back(segment.token_id);
    } else if (absl::Status status = EncodeSegment(std::move(segment.text), &ids); !status.ok()) {
      return status;
    }
  }
  if (add_special_tokens) {
    post_processor_.Apply(&ids);
  }
  return ids;
}

absl::StatusOr<std::string> HfTokenizer::DecodeImpl(std::span<const int32_t> ids,
                                                    bool skip_special_tokens, bool clean_up) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (const int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", id, " out of range [0, ", vocab_size(), ")"));
    }
    if (tokens_[id].data() == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", id, " has no token"));
    }
    if (skip_special_tokens && special_[id]) {
      continue;
    }
    tokens.emplace_back(tokens_[id]);
  }
  std::string text;
  if (decoder_ != nullptr) {
    decoder_->DecodeChain(&tokens);
    for (const std::string& token : tokens) {
      text.append(token);
    }
  } else {
    // HF joins tokens with spaces when there is no decoder.
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (i > 0) {
        text.push_back(' ');
      }
      text.append(tokens[i]);
    }
  }
  if (clean_up) {
    text = internal::CleanUpTokenizationSpaces(text);
  }
  return text;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(
    std::string_view tokenizer_json, std::string_view tokenizer_config_json) {
  absl::StatusOr<std::unique_ptr<HfTokenizer>> tokenizer =
      HfTokenizer::Load(tokenizer_json, tokenizer_config_json);
  if (!tokenizer.ok()) {
    return tokenizer.status();
  }
  return std::unique_ptr<Tokenizer>(std::move(*tokenizer));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromDir(const std::string& dir) {
  bool found = false;
  const std::string tokenizer_path = dir + "/tokenizer.json";
  absl::StatusOr<std::string> tokenizer_json = ReadFile(tokenizer_path, &found);
  if (!tokenizer_json.ok()) {
    return tokenizer_json.status();
  }
  if (!found) {
    return absl::NotFoundError(absl::StrCat("cannot open ", tokenizer_path));
  }
  absl::StatusOr<std::string> config_json = ReadFile(dir + "/tokenizer_config.json", &found);
  if (!config_json.ok()) {
    return config_json.status();
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = FromJson(*tokenizer_json, *config_json);
  if (!tokenizer.ok()) {
    return absl::Status(tokenizer.status().code(),
                        absl::StrCat(dir, ": ", tokenizer.status().message()));
  }
  return tokenizer;
}

// ---------------------------------------------------------------------------------------------
// IncrementalDetokenizer

namespace {

// Left context kept from the prompt: enough for decoders that look at the previous token.
constexpr size_t kPromptContext = 6;
// Ids held back waiting for a character to complete; beyond this the text is emitted as it is
// (a UTF-8 character spans at most 4 bytes, so the sequence is genuinely broken or a token
// decodes to U+FFFD itself).
constexpr size_t kMaxHeldIds = 8;
// Consumed ids are dropped from the front once this many accumulate, keeping memory bounded.
constexpr size_t kCompactThreshold = 64;

bool EndsWithReplacement(std::string_view text) {
  return text.ends_with(internal::kReplacementChar);
}

}  // namespace

IncrementalDetokenizer::IncrementalDetokenizer(const Tokenizer& tokenizer,
                                               std::span<const int32_t> prompt_ids,
                                               bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_(skip_special_tokens) {
  const size_t keep = std::min(prompt_ids.size(), kPromptContext);
  ids_.assign(prompt_ids.end() - keep, prompt_ids.end());
  prefix_offset_ = 0;
  read_offset_ = ids_.size();
}

std::string IncrementalDetokenizer::Advance(bool force) {
  const std::span<const int32_t> all(ids_);
  const absl::StatusOr<std::string> prefix_text = tokenizer_.DecodeWithoutCleanUp(
      all.subspan(prefix_offset_, read_offset_ - prefix_offset_), skip_special_);
  const absl::StatusOr<std::string> new_text =
      tokenizer_.DecodeWithoutCleanUp(all.subspan(prefix_offset_), skip_special_);
  if (!prefix_text.ok() || !new_text.ok()) {
    return std::string();  // unreachable: Push admits only ids that decode
  }
  const bool complete = new_text->size() > prefix_text->size() && !EndsWithReplacement(*new_text);
  if (!complete && !force) {
    return std::string();
  }
  size_t start = std::min(prefix_text->size(), new_text->size());
  // The window's text normally extends the prefix's; if a decoder made it differ, never start
  // the emitted text inside a character.
  while (start < new_text->size() &&
         (static_cast<unsigned char>((*new_text)[start]) & 0xC0) == 0x80) {
    ++start;
  }
  std::string delta = new_text->substr(start);
  prefix_offset_ = read_offset_;
  read_offset_ = ids_.size();
  if (prefix_offset_ >= kCompactThreshold) {
    ids_.erase(ids_.begin(), ids_.begin() + static_cast<std::ptrdiff_t>(prefix_offset_));
    read_offset_ -= prefix_offset_;
    prefix_offset_ = 0;
  }
  return EmitCleaned(std::move(delta), /*flush=*/false);
}

std::string IncrementalDetokenizer::EmitCleaned(std::string text, bool flush) {
  if (!tokenizer_.clean_up_tokenization_spaces()) {
    return text;
  }
  // The clean-up pass can join text across token boundaries (" ." -> "."): hold back the tail
  // that a later token could still change.
  pending_.append(text);
  const size_t safe = flush ? pending_.size() : internal::CleanUpSafePrefix(pending_);
  std::string out = internal::CleanUpTokenizationSpaces(std::string_view(pending_).substr(0, safe));
  pending_.erase(0, safe);
  return out;
}

std::string IncrementalDetokenizer::Push(int32_t id) {
  // Ids come from our own sampler; one the tokenizer cannot decode contributes no text rather
  // than poisoning the window.
  if (!tokenizer_.DecodeWithoutCleanUp(std::span<const int32_t>(&id, 1), skip_special_).ok()) {
    return std::string();
  }
  ids_.push_back(id);
  return Advance(/*force=*/ids_.size() - read_offset_ > kMaxHeldIds);
}

std::string IncrementalDetokenizer::Flush() {
  std::string out;
  if (read_offset_ < ids_.size()) {
    out = Advance(/*force=*/true);
  }
  out.append(EmitCleaned(std::string(), /*flush=*/true));
  return out;
}

std::optional<size_t> FindInvalidUtf8(std::string_view text) {
  return internal::FindInvalidUtf8(text);
}

}  // namespace tandem
