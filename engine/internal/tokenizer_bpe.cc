// BPE model: loading and validation of vocab/merges, and the merge loop.
#include "engine/internal/tokenizer_bpe.h"

#include <algorithm>
#include <bit>
#include <cstdio>
#include <functional>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "engine/internal/tokenizer_text.h"

namespace tandem::internal {
namespace {

using nlohmann::json;

// Optional string field: absent or null gives "", anything but a string is an error.
absl::StatusOr<std::string> OptionalString(const json& object, const char* key) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) {
    return std::string();
  }
  if (!it->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat("model.", key, " must be a string"));
  }
  return it->get<std::string>();
}

absl::StatusOr<bool> OptionalBool(const json& object, const char* key) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) {
    return false;
  }
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(absl::StrCat("model.", key, " must be a boolean"));
  }
  return it->get<bool>();
}

// Shortens a token for an error message; vocabularies hold some very long tokens.
std::string Quote(std::string_view token) {
  constexpr size_t kMax = 40;
  return absl::StrCat("'", AsAbsl(token.substr(0, kMax)), token.size() > kMax ? "...'" : "'");
}

}  // namespace

void BpeModel::MergeTable::Reserve(size_t count) {
  const size_t capacity = std::bit_ceil(std::max<size_t>(16, count * 2));
  slots_.assign(capacity, Slot{});
  mask_ = capacity - 1;
  shift_ = 64 - std::countr_zero(capacity);
}

// Fibonacci hashing: the high bits of the product depend on every bit of the key.
size_t BpeModel::MergeTable::Home(uint64_t key) const {
  return static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_);
}

void BpeModel::MergeTable::Insert(int32_t left, int32_t right, Merge merge) {
  const uint64_t key = Key(left, right);
  size_t i = Home(key);
  while (slots_[i].key != kEmpty && slots_[i].key != key) {
    i = (i + 1) & mask_;
  }
  slots_[i].key = key;
  slots_[i].merge = merge;
}

const BpeModel::Merge* BpeModel::MergeTable::Find(int32_t left, int32_t right) const {
  if (slots_.empty()) {
    return nullptr;
  }
  const uint64_t key = Key(left, right);
  size_t i = Home(key);
  while (slots_[i].key != kEmpty) {
    if (slots_[i].key == key) {
      return &slots_[i].merge;
    }
    i = (i + 1) & mask_;
  }
  return nullptr;
}

absl::StatusOr<std::unique_ptr<BpeModel>> BpeModel::FromJson(const json& model) {
  if (!model.is_object()) {
    return absl::InvalidArgumentError("tokenizer.json: model must be an object");
  }
  const auto type = model.find("type");
  if (type != model.end() && (!type->is_string() || type->get<std::string>() != "BPE")) {
    return absl::InvalidArgumentError(
        absl::StrCat("unsupported model type '",
                     type->is_string() ? type->get<std::string>() : type->dump(), "'"));
  }
  if (const auto dropout = model.find("dropout");
      dropout != model.end() && !dropout->is_null() &&
      !(dropout->is_number() && dropout->get<double>() == 0.0)) {
    // Dropout makes encoding random; serving must be deterministic.
    return absl::InvalidArgumentError("unsupported BPE dropout (must be null)");
  }
  auto bpe = std::unique_ptr<BpeModel>(new BpeModel());
  absl::StatusOr<bool> flag = OptionalBool(model, "fuse_unk");
  if (!flag.ok()) {
    return flag.status();
  }
  bpe->fuse_unk_ = *flag;
  if (!(flag = OptionalBool(model, "byte_fallback")).ok()) {
    return flag.status();
  }
  bpe->byte_fallback_ = *flag;
  if (!(flag = OptionalBool(model, "ignore_merges")).ok()) {
    return flag.status();
  }
  bpe->ignore_merges_ = *flag;
  absl::StatusOr<std::string> text = OptionalString(model, "continuing_subword_prefix");
  if (!text.ok()) {
    return text.status();
  }
  bpe->continuing_subword_prefix_ = std::move(*text);
  if (!(text = OptionalString(model, "end_of_word_suffix")).ok()) {
    return text.status();
  }
  bpe->end_of_word_suffix_ = std::move(*text);

  // Vocabulary.
  const auto vocab = model.find("vocab");
  if (vocab == model.end() || !vocab->is_object()) {
    return absl::InvalidArgumentError("tokenizer.json: model.vocab must be an object");
  }
  int64_t max_id = -1;
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    if (!it.value().is_number_integer()) {
      return absl::InvalidArgumentError(
          absl::StrCat("vocab token ", Quote(it.key()), " has a non-integer id"));
    }
    const int64_t id = it.value().get<int64_t>();
    if (id < 0 || id > kMaxTokenId) {
      return absl::InvalidArgumentError(absl::StrCat("vocab token ", Quote(it.key()), " has id ",
                                                     id, " outside [0, ", kMaxTokenId, "]"));
    }
    max_id = std::max(max_id, id);
  }
  bpe->id_to_token_.resize(static_cast<size_t>(max_id + 1));
  bpe->id_present_.assign(static_cast<size_t>(max_id + 1), false);
  bpe->vocab_.reserve(vocab->size());
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    const auto id = static_cast<int32_t>(it.value().get<int64_t>());
    if (bpe->id_present_[id]) {
      return absl::InvalidArgumentError(absl::StrCat("vocab tokens ", Quote(bpe->id_to_token_[id]),
                                                     " and ", Quote(it.key()), " share id ", id));
    }
    bpe->id_present_[id] = true;
    bpe->id_to_token_[id] = it.key();
    bpe->vocab_.emplace(it.key(), id);
  }

  // Unknown token and byte fallback.
  if (!(text = OptionalString(model, "unk_token")).ok()) {
    return text.status();
  }
  if (!text->empty()) {
    const auto unk = bpe->vocab_.find(*text);
    if (unk == bpe->vocab_.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("unk_token ", Quote(*text), " is not in the vocabulary"));
    }
    bpe->unk_id_ = unk->second;
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    const auto it = bpe->vocab_.find(std::string_view(name));
    bpe->byte_token_ids_[b] = it == bpe->vocab_.end() ? -1 : it->second;
  }

  // Merges: the list position is the rank.
  const auto merges = model.find("merges");
  if (merges == model.end() || merges->is_null()) {
    return bpe;
  }
  if (!merges->is_array()) {
    return absl::InvalidArgumentError("tokenizer.json: model.merges must be an array");
  }
  bpe->merges_.Reserve(merges->size());
  std::string merged;
  bool crossing_merge = false;
  for (size_t rank = 0; rank < merges->size(); ++rank) {
    const json& entry = (*merges)[rank];
    std::string_view left;
    std::string_view right;
    if (entry.is_string()) {
      // The legacy "left right" form: tokens cannot contain a space there.
      const std::string& line = entry.get_ref<const std::string&>();
      const size_t space = line.find(' ');
      if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
        return absl::InvalidArgumentError(
            absl::StrCat("merge ", rank, " (", Quote(line), ") is not two tokens"));
      }
      left = std::string_view(line).substr(0, space);
      right = std::string_view(line).substr(space + 1);
    } else if (entry.is_array() && entry.size() == 2 && entry[0].is_string() &&
               entry[1].is_string()) {
      left = entry[0].get_ref<const std::string&>();
      right = entry[1].get_ref<const std::string&>();
    } else {
      return absl::InvalidArgumentError(absl::StrCat("merge ", rank, " is not two tokens"));
    }
    const auto left_id = bpe->vocab_.find(left);
    const auto right_id = bpe->vocab_.find(right);
    for (const auto& [part, found] : {std::pair{left, left_id}, std::pair{right, right_id}}) {
      if (found == bpe->vocab_.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("merge ", rank, " (", Quote(left), " ", Quote(right), ") refers to token ",
                         Quote(part), " that is not in the vocabulary"));
      }
    }
    // The right part of a merge carries the continuing-subword prefix; the merged token does not
    // repeat it.
    std::string_view right_body = right;
    if (!bpe->continuing_subword_prefix_.empty() &&
        right_body.starts_with(bpe->continuing_subword_prefix_)) {
      right_body.remove_prefix(bpe->continuing_subword_prefix_.size());
    }
    merged.assign(left);
    merged.append(right_body);
    const auto merged_id = bpe->vocab_.find(merged);
    if (merged_id == bpe->vocab_.end()) {
      return absl::InvalidArgumentError(absl::StrCat("merge ", rank, " (", Quote(left), " ",
                                                     Quote(right), ") makes token ", Quote(merged),
                                                     " that is not in the vocabulary"));
    }
    bpe->merges_.Insert(left_id->second, right_id->second,
                        Merge{static_cast<int32_t>(rank), merged_id->second});
    if (crossing_merge || merged.find(kWordMarker) == std::string::npos) {
      continue;
    }
    // Does the merged token hold a marker right after something that is not a marker?
    for (size_t at = merged.find(kWordMarker, 1); at != std::string::npos;
         at = merged.find(kWordMarker, at + kWordMarker.size())) {
      if (!std::string_view(merged).substr(0, at).ends_with(kWordMarker)) {
        crossing_merge = true;
        break;
      }
    }
  }
  bpe->cut_at_word_marker_ = !crossing_merge && !bpe->ignore_merges_ &&
                             bpe->continuing_subword_prefix_.empty() &&
                             bpe->end_of_word_suffix_.empty() && bpe->vocab_.contains(kWordMarker);
  return bpe;
}

std::optional<int32_t> BpeModel::TokenToId(std::string_view token) const {
  const auto it = vocab_.find(token);
  if (it == vocab_.end()) {
    return std::nullopt;
  }
  return it->second;
}

const std::string* BpeModel::IdToToken(int32_t id) const {
  if (id < 0 || id >= id_limit() || !id_present_[id]) {
    return nullptr;
  }
  return &id_to_token_[id];
}

void BpeModel::InitialSymbols(std::string_view word, std::vector<int32_t>* symbols) const {
  std::string decorated;
  // A run of unknown characters waiting to be emitted as one <unk> (fuse_unk) or several.
  bool unk_pending = false;
  const auto flush_unk = [&] {
    if (unk_pending) {
      symbols->push_back(*unk_id_);
      unk_pending = false;
    }
  };
  size_t i = 0;
  while (i < word.size()) {
    const size_t length =
        std::min(Utf8SequenceLength(static_cast<unsigned char>(word[i])), word.size() - i);
    std::string_view piece = word.substr(i, length);
    const bool first = i == 0;
    i += length;
    const bool last = i == word.size();
    if ((!first && !continuing_subword_prefix_.empty()) || (last && !end_of_word_suffix_.empty())) {
      decorated.clear();
      if (!first) {
        decorated.append(continuing_subword_prefix_);
      }
      decorated.append(piece);
      if (last) {
        decorated.append(end_of_word_suffix_);
      }
      piece = decorated;
    }
    if (const auto it = vocab_.find(piece); it != vocab_.end()) {
      flush_unk();
      symbols->push_back(it->second);
      continue;
    }
    if (byte_fallback_ && std::all_of(piece.begin(), piece.end(), [this](char c) {
          return byte_token_ids_[static_cast<unsigned char>(c)] >= 0;
        })) {
      flush_unk();
      for (const char c : piece) {
        symbols->push_back(byte_token_ids_[static_cast<unsigned char>(c)]);
      }
      continue;
    }
    if (unk_id_.has_value()) {
      if (!fuse_unk_) {
        flush_unk();
      }
      unk_pending = true;
    }
    // Without an unknown token the character is dropped, as HF does.
  }
  flush_unk();
}

void BpeModel::MergeSymbols(std::vector<int32_t>* symbols) const {
  std::vector<int32_t>& id = *symbols;
  const auto n = static_cast<int32_t>(id.size());
  if (n < 2) {
    return;
  }
  // Symbols form a doubly linked list over `id`; merged-away symbols get id -1.
  std::vector<int32_t> prev(n);
  std::vector<int32_t> next(n);
  for (int32_t i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  // Candidates are (rank, position) packed into one integer, so that the min-heap orders them
  // lowest rank first, then leftmost: HF's order. Eight-byte entries keep the heap compact.
  const auto pack = [](int32_t rank, int32_t pos) {
    return (static_cast<uint64_t>(rank) << 32) | static_cast<uint32_t>(pos);
  };
  std::vector<uint64_t> heap;
  heap.reserve(n);
  for (int32_t i = 0; i + 1 < n; ++i) {
    if (const Merge* merge = merges_.Find(id[i], id[i + 1])) {
      heap.push_back(pack(merge->rank, i));
    }
  }
  const std::greater<uint64_t> later;
  std::make_heap(heap.begin(), heap.end(), later);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    const uint64_t top = heap.back();
    heap.pop_back();
    const auto rank = static_cast<int32_t>(top >> 32);
    const auto pos = static_cast<int32_t>(top & 0xFFFFFFFFu);
    const int32_t right = next[pos];
    if (id[pos] < 0 || right < 0) {
      continue;
    }
    // A stale candidate: the pair at `pos` was merged or grew since it was queued. (Symbols only
    // grow, so an unchanged rank means an unchanged pair.)
    const Merge* merge = merges_.Find(id[pos], id[right]);
    if (merge == nullptr || merge->rank != rank) {
      continue;
    }
    id[pos] = merge->new_id;
    id[right] = -1;
    next[pos] = next[right];
    if (next[pos] >= 0) {
      prev[next[pos]] = pos;
    }
    if (prev[pos] >= 0) {
      if (const Merge* m = merges_.Find(id[prev[pos]], id[pos])) {
        heap.push_back(pack(m->rank, prev[pos]));
        std::push_heap(heap.begin(), heap.end(), later);
      }
    }
    if (next[pos] >= 0) {
      if (const Merge* m = merges_.Find(id[pos], id[next[pos]])) {
        heap.push_back(pack(m->rank, pos));
        std::push_heap(heap.begin(), heap.end(), later);
      }
    }
  }
  id.erase(std::remove(id.begin(), id.end(), -1), id.end());
}

void BpeModel::TokenizeUncached(std::string_view word, std::vector<int32_t>* ids) const {
  std::vector<int32_t> symbols;
  symbols.reserve(word.size());
  InitialSymbols(word, &symbols);
  MergeSymbols(&symbols);
  ids->insert(ids->end(), symbols.begin(), symbols.end());
}

void BpeModel::Tokenize(std::string_view word, std::vector<int32_t>* ids) const {
  if (word.empty()) {
    return;
  }
  if (ignore_merges_) {
    if (const auto it = vocab_.find(word); it != vocab_.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  if (!cut_at_word_marker_) {
    TokenizeWord(word, ids);
    return;
  }
  // No merge joins anything to a following word marker, so each "▁word" merges on its own:
  // same ids, shorter merge loops, and cache hits for SentencePiece-style models that see the
  // whole text as one word.
  size_t start = 0;
  for (size_t cut = word.find(kWordMarker, 1); cut != std::string_view::npos;
       cut = word.find(kWordMarker, cut + kWordMarker.size())) {
    if (cut == start || word.substr(0, cut).ends_with(kWordMarker)) {
      continue;
    }
    TokenizeWord(word.substr(start, cut - start), ids);
    start = cut;
  }
  TokenizeWord(word.substr(start), ids);
}

void BpeModel::TokenizeWord(std::string_view word, std::vector<int32_t>* ids) const {
  if (word.size() > kMaxCachedWordBytes) {
    TokenizeUncached(word, ids);
    return;
  }
  {
    absl::ReaderMutexLock lock(&cache_mutex_);
    if (const auto it = cache_.find(word); it != cache_.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> word_ids;
  TokenizeUncached(word, &word_ids);
  ids->insert(ids->end(), word_ids.begin(), word_ids.end());
  absl::MutexLock lock(&cache_mutex_);
  if (cache_.size() >= kCacheCapacity) {
    cache_.clear();
  }
  cache_.emplace(std::string(word), std::move(word_ids));
}

}  // namespace tandem::internal
