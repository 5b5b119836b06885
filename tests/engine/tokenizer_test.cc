// Tokenizer tests: golden encodings/decodings of real tokenizer.json files (made with
// transformers.js), streaming detokenization, and hostile model files and inputs.
#include "engine/tokenizer.h"

#include <gtest/gtest.h>

#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace tandem {
namespace {

using nlohmann::json;

std::string TokenizerDir(const std::string& name) {
  return std::string(TANDEM_TEST_DATA_DIR) + "/tokenizers/" + name;
}

std::string ReadFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  std::ostringstream contents;
  contents << file.rdbuf();
  return contents.str();
}

// Loaded once per test binary: the big vocabularies take a while under sanitizers.
const Tokenizer& Get(const std::string& name) {
  static auto* const cache = new std::map<std::string, std::unique_ptr<Tokenizer>>();
  auto it = cache->find(name);
  if (it == cache->end()) {
    absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = Tokenizer::FromDir(TokenizerDir(name));
    if (!tokenizer.ok()) {
      ADD_FAILURE() << name << ": " << tokenizer.status();
      std::abort();
    }
    it = cache->emplace(name, std::move(*tokenizer)).first;
  }
  return *it->second;
}

const json& Golden(const std::string& name) {
  static auto* const cache = new std::map<std::string, json>();
  auto it = cache->find(name);
  if (it == cache->end()) {
    it = cache->emplace(name, json::parse(ReadFile(TokenizerDir(name) + "/golden.json"))).first;
  }
  return it->second;
}

std::vector<int32_t> Ids(const json& ids) { return ids.get<std::vector<int32_t>>(); }

// Feeds `generated` one id at a time after `prompt` and returns all the streamed text.
std::string Stream(const Tokenizer& tokenizer, const std::vector<int32_t>& prompt,
                   const std::vector<int32_t>& generated, bool skip_special) {
  IncrementalDetokenizer detokenizer(tokenizer, prompt, skip_special);
  std::string text;
  for (const int32_t id : generated) {
    text += detokenizer.Push(id);
  }
  return text + detokenizer.Flush();
}

// One test per tokenizer looping over its golden cases (not one per case): every ctest entry is
// its own process, and loading a big vocabulary dominates a case's time, most of all under
// sanitizers. A failure names the case by index and text.
class TokenizerGoldenTest : public ::testing::TestWithParam<std::string> {
 protected:
  const Tokenizer& tokenizer() const { return Get(GetParam()); }
  const json& cases() const { return Golden(GetParam()).at("cases"); }
};

// Encodes and decodes one case as transformers.js did.
void CheckGoldenCase(const Tokenizer& tokenizer, const json& c) {
  const std::string text = c.at("text");
  const std::vector<int32_t> ids = Ids(c.at("ids"));
  const std::vector<int32_t> ids_with_special = Ids(c.at("ids_with_special"));

  absl::StatusOr<std::vector<int32_t>> encoded = tokenizer.Encode(text, false);
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  EXPECT_EQ(*encoded, ids);
  encoded = tokenizer.Encode(text, true);
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  EXPECT_EQ(*encoded, ids_with_special);

  absl::StatusOr<std::string> decoded = tokenizer.Decode(ids, false);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(*decoded, c.at("decoded").get<std::string>());
  decoded = tokenizer.Decode(ids_with_special, false);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(*decoded, c.at("decoded_with_special").get<std::string>());
  decoded = tokenizer.Decode(ids_with_special, true);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(*decoded, c.at("decoded_with_special_skip").get<std::string>());
}

// Streams one case's ids one at a time, alone and after a prompt.
void CheckStreamingCase(const Tokenizer& tokenizer, const json& c) {
  const std::vector<int32_t> ids = Ids(c.at("ids_with_special"));
  for (const bool skip : {false, true}) {
    EXPECT_EQ(Stream(tokenizer, {}, ids, skip), *tokenizer.Decode(ids, skip)) << skip;
  }
  // With a prompt, the stream continues the prompt's text.
  const size_t split = ids.size() / 2;
  const std::vector<int32_t> prompt(ids.begin(), ids.begin() + split);
  const std::vector<int32_t> generated(ids.begin() + split, ids.end());
  const std::string whole = *tokenizer.Decode(ids, false);
  const std::string prompt_text = *tokenizer.Decode(prompt, false);
  if (whole.starts_with(prompt_text) && !prompt_text.ends_with("\xEF\xBF\xBD")) {
    EXPECT_EQ(Stream(tokenizer, prompt, generated, false), whole.substr(prompt_text.size()));
  }
}

TEST_P(TokenizerGoldenTest, EncodesAndDecodesLikeTransformers) {
  ASSERT_FALSE(cases().empty());
  for (size_t i = 0; i < cases().size(); ++i) {
    SCOPED_TRACE(testing::Message() << "case " << i << ": " << cases()[i].at("text").dump());
    CheckGoldenCase(tokenizer(), cases()[i]);
  }
}

TEST_P(TokenizerGoldenTest, StreamingOneIdAtATimeMatchesFullDecode) {
  ASSERT_FALSE(cases().empty());
  for (size_t i = 0; i < cases().size(); ++i) {
    SCOPED_TRACE(testing::Message() << "case " << i << ": " << cases()[i].at("text").dump());
    CheckStreamingCase(tokenizer(), cases()[i]);
  }
}

INSTANTIATE_TEST_SUITE_P(Tokenizer, TokenizerGoldenTest,
                         ::testing::Values("llama3_1", "qwen3", "llama2", "demo"));

TEST(TokenizerSpecialTokensTest, BosEosAndSpecialFlagsComeFromTheFiles) {
  const Tokenizer& llama3 = Get("llama3_1");
  EXPECT_EQ(llama3.bos_token_id(), 128000);
  EXPECT_EQ(llama3.eos_token_id(), 128009);  // <|eot_id|> from tokenizer_config.json
  EXPECT_EQ(llama3.vocab_size(), 128256);
  EXPECT_TRUE(llama3.IsSpecial(128009));
  EXPECT_FALSE(llama3.IsSpecial(9906));
  EXPECT_FALSE(llama3.IsSpecial(-1));
  EXPECT_FALSE(llama3.IsSpecial(1 << 30));
  EXPECT_EQ(llama3.TokenToId("<|eot_id|>"), 128009);
  EXPECT_EQ(llama3.TokenToId("Hello"), 9906);
  EXPECT_EQ(llama3.TokenToId("no such token at all"), std::nullopt);

  const Tokenizer& qwen = Get("qwen3");
  EXPECT_EQ(qwen.bos_token_id(), std::nullopt);
  EXPECT_EQ(qwen.eos_token_id(), 151645);
  EXPECT_EQ(qwen.vocab_size(), 151669);
  EXPECT_FALSE(qwen.IsSpecial(*qwen.TokenToId("<think>")));  // added but not special

  const Tokenizer& llama2 = Get("llama2");
  EXPECT_EQ(llama2.bos_token_id(), 1);
  EXPECT_EQ(llama2.eos_token_id(), 2);
  EXPECT_EQ(llama2.vocab_size(), 32000);
}

TEST(TokenizerSpecialTokensTest, NonSpecialAddedTokenIsKeptWhenSkipping) {
  const Tokenizer& qwen = Get("qwen3");
  const std::vector<int32_t> ids = *qwen.Encode("<think>hi</think><|im_end|>", false);
  ASSERT_EQ(ids.size(), 4u);
  EXPECT_EQ(*qwen.Decode(ids, true), "<think>hi</think>");
  EXPECT_EQ(*qwen.Decode(ids, false), "<think>hi</think><|im_end|>");
}

TEST(TokenizerSpecialTokensTest, EmptyTextGetsOnlyTheTemplate) {
  EXPECT_TRUE(Get("llama3_1").Encode("", false)->empty());
  EXPECT_EQ(*Get("llama3_1").Encode("", true), std::vector<int32_t>{128000});
  EXPECT_EQ(*Get("llama2").Encode("", true), std::vector<int32_t>{1});
  EXPECT_TRUE(Get("qwen3").Encode("", true)->empty());
  EXPECT_EQ(*Get("llama2").Decode({}, false), "");
}

// ----------------------------------------------------------------------------------------------
// Streaming

// Ids of the byte-level tokens that stand for single bytes of `text` (Llama 3 / Qwen vocabularies
// hold all 256).
std::vector<int32_t> ByteLevelIds(const Tokenizer& tokenizer, std::string_view text) {
  // GPT-2 alphabet: printable Latin-1 maps to itself, the rest shifts past U+00FF.
  std::vector<std::string> alphabet(256);
  int next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    const int cp = printable ? b : next++;
    std::string s;
    if (cp < 0x80) {
      s.push_back(static_cast<char>(cp));
    } else {
      s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    alphabet[b] = s;
  }
  std::vector<int32_t> ids;
  for (const char c : text) {
    const std::optional<int32_t> id = tokenizer.TokenToId(alphabet[static_cast<unsigned char>(c)]);
    EXPECT_TRUE(id.has_value());
    ids.push_back(id.value_or(0));
  }
  return ids;
}

TEST(TokenizerStreamTest, HoldsBackMultiByteCharactersSplitAcrossByteTokens) {
  for (const std::string name : {"llama3_1", "qwen3"}) {
    const Tokenizer& tokenizer = Get(name);
    for (const std::string text : {"🍕", "你", "€", "a👩🏽‍💻b"}) {
      SCOPED_TRACE(name + " " + text);
      const std::vector<int32_t> ids = ByteLevelIds(tokenizer, text);
      IncrementalDetokenizer detokenizer(tokenizer, {}, false);
      std::string streamed;
      for (const int32_t id : ids) {
        const std::string piece = detokenizer.Push(id);
        EXPECT_EQ(piece.find("\xEF\xBF\xBD"), std::string::npos) << "broken character emitted";
        streamed += piece;
      }
      streamed += detokenizer.Flush();
      EXPECT_EQ(streamed, text);
    }
  }
}

TEST(TokenizerStreamTest, Llama2ByteFallbackEuroSign) {
  const Tokenizer& llama2 = Get("llama2");
  const std::vector<int32_t> ids = {*llama2.TokenToId("<0xE2>"), *llama2.TokenToId("<0x82>"),
                                    *llama2.TokenToId("<0xAC>")};
  IncrementalDetokenizer detokenizer(llama2, *llama2.Encode("Price:", true), false);
  EXPECT_EQ(detokenizer.Push(ids[0]), "");
  EXPECT_EQ(detokenizer.Push(ids[1]), "");
  EXPECT_EQ(detokenizer.Push(ids[2]), "€");
  EXPECT_EQ(detokenizer.Push(*llama2.TokenToId("▁five")), " five");
  EXPECT_EQ(detokenizer.Flush(), "");
  EXPECT_EQ(*llama2.Decode(ids, false), "€");
}

TEST(TokenizerStreamTest, IncompleteTailIsFlushedAsReplacementLikeFullDecode) {
  const Tokenizer& llama2 = Get("llama2");
  const std::vector<int32_t> llama2_ids = {*llama2.TokenToId("▁a"), *llama2.TokenToId("<0xE2>"),
                                           *llama2.TokenToId("<0x82>")};
  EXPECT_EQ(Stream(llama2, {}, llama2_ids, false), *llama2.Decode(llama2_ids, false));
  EXPECT_EQ(*llama2.Decode(llama2_ids, false), "a\xEF\xBF\xBD\xEF\xBF\xBD");  // one per byte

  const Tokenizer& llama3 = Get("llama3_1");
  std::vector<int32_t> llama3_ids = *llama3.Encode("x", false);
  for (const int32_t id : ByteLevelIds(llama3, "\xE2\x82")) {
    llama3_ids.push_back(id);
  }
  EXPECT_EQ(*llama3.Decode(llama3_ids, false), "x\xEF\xBF\xBD");  // one per maximal subpart
  EXPECT_EQ(Stream(llama3, {}, llama3_ids, false), "x\xEF\xBF\xBD");
}

TEST(TokenizerStreamTest, NeverHoldsMoreThanAFewIdsOnABrokenSequence) {
  const Tokenizer& llama3 = Get("llama3_1");
  // A lone continuation byte, repeated: each decodes to U+FFFD and never completes.
  const std::vector<int32_t> bad = ByteLevelIds(llama3, "\x80");
  IncrementalDetokenizer detokenizer(llama3, {}, false);
  std::string streamed;
  for (int i = 0; i < 40; ++i) {
    streamed += detokenizer.Push(bad[0]);
  }
  EXPECT_FALSE(streamed.empty());
  streamed += detokenizer.Flush();
  EXPECT_EQ(streamed, *llama3.Decode(std::vector<int32_t>(40, bad[0]), false));
}

TEST(TokenizerStreamTest, CleanUpSpacesIsStreamedExactly) {
  const Tokenizer& llama3 = Get("llama3_1");  // clean_up_tokenization_spaces: true
  for (const std::string text :
       {"Hello , world ! Is it ? Yes .", "I don 't know , you 're right", "a ' b ' ,c  .d",
        "x ,,, y !! z .. end .", "unicode 你好 , ok ."}) {
    SCOPED_TRACE(text);
    const std::vector<int32_t> ids = *llama3.Encode(text, true);
    const std::string decoded = *llama3.Decode(ids, false);
    EXPECT_EQ(Stream(llama3, {}, ids, false), decoded);
    EXPECT_NE(decoded, "<|begin_of_text|>" + text);  // the clean-up did change something
  }
}

TEST(TokenizerStreamTest, LongGenerationKeepsAWindow) {
  const Tokenizer& qwen = Get("qwen3");
  std::string text;
  for (int i = 0; i < 300; ++i) {
    text += "Token " + std::to_string(i) + " 你好🍕, ";
  }
  const std::vector<int32_t> ids = *qwen.Encode(text, false);
  EXPECT_EQ(Stream(qwen, *qwen.Encode("prompt", false), ids, false), text);
}

TEST(TokenizerStreamTest, UndecodableIdIsIgnored) {
  const Tokenizer& demo = Get("demo");
  IncrementalDetokenizer detokenizer(demo, {}, false);
  EXPECT_EQ(detokenizer.Push(-5), "");
  EXPECT_EQ(detokenizer.Push(1 << 30), "");
  EXPECT_EQ(detokenizer.Push(*demo.TokenToId("A")), "A");
  EXPECT_EQ(detokenizer.Flush(), "");
}

// ----------------------------------------------------------------------------------------------
// Hostile input

TEST(TokenizerBadInputTest, InvalidUtf8IsRejectedWithItsOffset) {
  const Tokenizer& llama3 = Get("llama3_1");
  for (const auto& [text, offset] :
       std::vector<std::pair<std::string, int>>{{"abc\xFF", 3},
                                                {"\xC3", 0},
                                                {"ok \xE2\x82", 3},
                                                {"\xC0\xAF", 0},            // overlong
                                                {"x\xED\xA0\x80", 1},       // surrogate
                                                {"ab\xF4\x90\x80\x80", 2},  // above U+10FFFF
                                                {std::string("a\0b\x80", 4), 3}}) {
    const absl::StatusOr<std::vector<int32_t>> ids = llama3.Encode(text, true);
    ASSERT_FALSE(ids.ok());
    EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(ids.status().message().find("byte offset " + std::to_string(offset)),
              absl::string_view::npos)
        << ids.status();
  }
  // NUL is valid UTF-8.
  EXPECT_TRUE(llama3.Encode(std::string("a\0b", 3), false).ok());
}

TEST(TokenizerBadInputTest, OutOfRangeIdsAreRejected) {
  for (const std::string name : {"llama3_1", "llama2", "demo"}) {
    const Tokenizer& tokenizer = Get(name);
    for (const int32_t id : {-1, tokenizer.vocab_size(), INT32_MAX, INT32_MIN}) {
      const std::vector<int32_t> ids = {1, id};
      const absl::StatusOr<std::string> text = tokenizer.Decode(ids, false);
      ASSERT_FALSE(text.ok()) << id;
      EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument);
    }
  }
}

// A small byte-level-free BPE tokenizer for load-error tests; `patch` edits it before dumping.
std::string MiniTokenizer(const std::function<void(json&)>& patch = nullptr) {
  json root = {
      {"version", "1.0"},
      {"added_tokens", json::array({{{"id", 5},
                                     {"content", "<s>"},
                                     {"special", true},
                                     {"lstrip", false},
                                     {"rstrip", false},
                                     {"normalized", false},
                                     {"single_word", false}}})},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Split"},
        {"pattern", {{"String", " "}}},
        {"behavior", "Removed"},
        {"invert", false}}},
      {"post_processor", nullptr},
      {"decoder", nullptr},
      {"model",
       {{"type", "BPE"},
        {"vocab", {{"a", 0}, {"b", 1}, {"ab", 2}, {"c", 3}, {"abc", 4}}},
        {"merges", json::array({"a b", "ab c"})}}},
  };
  if (patch) {
    patch(root);
  }
  return root.dump();
}

absl::Status LoadStatus(const std::string& tokenizer_json, const std::string& config = "") {
  return Tokenizer::FromJson(tokenizer_json, config).status();
}

TEST(TokenizerBadInputTest, MiniTokenizerWorks) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = Tokenizer::FromJson(MiniTokenizer(), "");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ(*(*tokenizer)->Encode("abc ab<s>a", false), (std::vector<int32_t>{4, 2, 5, 0}));
  EXPECT_EQ(*(*tokenizer)->Decode(std::vector<int32_t>{4, 2}, false),
            "abc ab");  // no decoder: joined by spaces
  EXPECT_EQ((*tokenizer)->vocab_size(), 6);
}

TEST(TokenizerBadInputTest, MalformedJsonIsRejected) {
  for (const std::string text : {"", "{", "[1, 2]", "null", "{\"model\": 3}", "\xFF\xFE",
                                 "{\"model\": {\"type\": \"BPE\", \"vocab\": []}}"}) {
    const absl::Status status = LoadStatus(text);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << text << ": " << status;
  }
  EXPECT_EQ(LoadStatus(MiniTokenizer(), "{not json").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Tokenizer::FromDir("/nonexistent/dir").status().code(), absl::StatusCode::kNotFound);
}

TEST(TokenizerBadInputTest, UnknownTypesAreRefusedByName) {
  const std::vector<std::pair<std::function<void(json&)>, std::string>> cases = {
      {[](json& j) {
         j["pre_tokenizer"] = {{"type", "Metaspace"}};
       },
       "unsupported pre_tokenizer type 'Metaspace'"},
      {[](json& j) {
         j["normalizer"] = {{"type", "BertNormalizer"}};
       },
       "unsupported normalizer type 'BertNormalizer'"},
      {[](json& j) {
         j["decoder"] = {{"type", "Sequence"}, {"decoders", {{{"type", "WordPiece"}}}}};
       },
       "unsupported decoder type 'WordPiece'"},
      {[](json& j) {
         j["post_processor"] = {{"type", "Fancy"}};
       },
       "unsupported post_processor type 'Fancy'"},
      {[](json& j) { j["model"]["type"] = "Unigram"; }, "unsupported model type 'Unigram'"},
      {[](json& j) { j["pre_tokenizer"]["behavior"] = "Sideways"; },
       "unsupported Split behavior 'Sideways'"},
  };
  for (const auto& [patch, message] : cases) {
    const absl::Status status = LoadStatus(MiniTokenizer(patch));
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << message;
    EXPECT_NE(status.message().find(message), absl::string_view::npos) << status;
  }
}

TEST(TokenizerBadInputTest, VocabAndMergesAreValidated) {
  const std::vector<std::pair<std::function<void(json&)>, std::string>> cases = {
      {[](json& j) { j["model"]["merges"].push_back("a zz"); }, "'zz' that is not in the vocab"},
      {[](json& j) {
         j["model"]["merges"].push_back(json::array({"c", "c"}));
       },
       "makes token 'cc' that is not in the vocab"},
      {[](json& j) { j["model"]["merges"].push_back("abc"); }, "is not two tokens"},
      {[](json& j) { j["model"]["merges"].push_back(7); }, "is not two tokens"},
      {[](json& j) { j["model"]["vocab"]["d"] = 1; }, "share id 1"},
      {[](json& j) { j["model"]["vocab"]["d"] = -3; }, "outside"},
      {[](json& j) { j["model"]["vocab"]["d"] = 1LL << 40; }, "outside"},
      {[](json& j) { j["model"]["vocab"]["d"] = "x"; }, "non-integer id"},
      {[](json& j) { j["model"]["vocab"]["d"] = 5000000; }, "only"},
      {[](json& j) { j["model"]["unk_token"] = "<unk>"; }, "unk_token '<unk>' is not in"},
      {[](json& j) { j["added_tokens"][0]["id"] = 1 << 30; }, "out of range"},
      {[](json& j) { j["added_tokens"].push_back(j["added_tokens"][0]); }, "listed twice"},
      {[](json& j) {
         json second = j["added_tokens"][0];
         second["content"] = "</s>";
         j["added_tokens"].push_back(second);
       },
       "share id 5"},
      {[](json& j) {
         j["pre_tokenizer"]["pattern"] = {{"Regex", "(unclosed"}};
       },
       "does not compile"},
      {[](json& j) {
         j["post_processor"] = {{"type", "TemplateProcessing"},
                                {"single", {{{"SpecialToken", {{"id", "<x>"}, {"type_id", 0}}}}}},
                                {"special_tokens", {{"<x>", {{"id", "<x>"}, {"ids", {99}}}}}}};
       },
       "id 99, which has no token"},
      {[](json& j) { j["model"]["dropout"] = 0.1; }, "dropout"},
  };
  for (const auto& [patch, message] : cases) {
    const absl::Status status = LoadStatus(MiniTokenizer(patch));
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << message;
    EXPECT_NE(status.message().find(message), absl::string_view::npos) << status;
  }
}

TEST(TokenizerBadInputTest, MegabyteWordWithoutSpacesEncodes) {
  std::mt19937 rng(7);
  std::string letters(1 << 20, 'a');
  for (char& c : letters) {
    c = static_cast<char>('a' + rng() % 26);
  }
  for (const std::string name : {"llama3_1", "demo"}) {
    const absl::StatusOr<std::vector<int32_t>> ids = Get(name).Encode(letters, false);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_GT(ids->size(), letters.size() / 8);
    EXPECT_EQ(*Get(name).Decode(*ids, false), letters);
  }
  // No pre-tokenizer: the whole text is one word for the BPE model.
  std::string cjk;
  while (cjk.size() < (1 << 20)) {
    cjk += "你好世界𠀀";
  }
  const absl::StatusOr<std::vector<int32_t>> ids = Get("llama2").Encode(cjk, false);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*Get("llama2").Decode(*ids, false), cjk);
}

}  // namespace
}  // namespace tandem
