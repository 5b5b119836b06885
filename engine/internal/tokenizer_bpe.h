// The BPE model of a Hugging Face tokenizer.json: vocabulary, ranked merges, byte fallback and
// unknown-token handling, with an O(n log n) merge loop and a cache for repeated words.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace tandem::internal {

// Transparent hashing so that string_view lookups do not build a std::string.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using TokenIdMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

class BpeModel {
 public:
  // Largest id accepted from a model folder; well above any released vocabulary, small enough
  // that the id tables stay bounded for a hostile file.
  static constexpr int32_t kMaxTokenId = (1 << 24) - 1;

  // Parses the "model" object of tokenizer.json (type "BPE"). Every id is in [0, kMaxTokenId],
  // no two tokens share an id, and every merge joins two vocabulary tokens into a third.
  static absl::StatusOr<std::unique_ptr<BpeModel>> FromJson(const nlohmann::json& model);

  // Appends the ids of one pre-tokenized `word` (valid UTF-8). Thread-safe.
  void Tokenize(std::string_view word, std::vector<int32_t>* ids) const;

  std::optional<int32_t> TokenToId(std::string_view token) const;
  // The vocabulary token with this id, or nullptr.
  const std::string* IdToToken(int32_t id) const;
  // Highest vocabulary id + 1.
  int32_t id_limit() const { return static_cast<int32_t>(id_to_token_.size()); }
  size_t vocab_count() const { return vocab_.size(); }

 private:
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  // Open-addressing map from a pair of ids to its merge: looked up for every candidate pair, so
  // it avoids std::unordered_map's node chasing.
  class MergeTable {
   public:
    void Reserve(size_t count);
    // A pair listed twice keeps its last merge, as HF's map construction does.
    void Insert(int32_t left, int32_t right, Merge merge);
    const Merge* Find(int32_t left, int32_t right) const;

   private:
    struct Slot {
      uint64_t key = kEmpty;
      Merge merge{};
    };
    static constexpr uint64_t kEmpty = ~uint64_t{0};
    static uint64_t Key(int32_t left, int32_t right) {
      return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
             static_cast<uint32_t>(right);
    }
    size_t Home(uint64_t key) const;

    std::vector<Slot> slots_;
    size_t mask_ = 0;
    int shift_ = 64;
  };

  BpeModel() = default;
  // Splits `word` into its initial symbols (characters, byte-fallback bytes, unknown runs).
  void InitialSymbols(std::string_view word, std::vector<int32_t>* symbols) const;
  // Applies the merges to `symbols` in rank order, leftmost first among equal ranks.
  void MergeSymbols(std::vector<int32_t>* symbols) const;
  void TokenizeUncached(std::string_view word, std::vector<int32_t>* ids) const;
  // Tokenizes one word through the cache.
  void TokenizeWord(std::string_view word, std::vector<int32_t>* ids) const;

  // SentencePiece's word-start marker "▁" (U+2581).
  static constexpr std::string_view kWordMarker = "\xE2\x96\x81";

  TokenIdMap vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> id_present_;
  MergeTable merges_;
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  std::string continuing_subword_prefix_;
  std::string end_of_word_suffix_;
  std::array<int32_t, 256> byte_token_ids_{};  // ids of <0xNN>, -1 where absent
  // Whether words may be cut before each "▁" that follows a non-marker character: true when no
  // merge produces a token with such a "▁" inside, so that the cut changes no ids.
  bool cut_at_word_marker_ = false;

  // Words seen before, with their ids. Bounded: cleared when full.
  static constexpr size_t kCacheCapacity = 1 << 16;
  static constexpr size_t kMaxCachedWordBytes = 128;
  mutable absl::Mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> cache_
      ABSL_GUARDED_BY(cache_mutex_);
};

}  // namespace tandem::internal
