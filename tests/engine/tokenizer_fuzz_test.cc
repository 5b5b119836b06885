// Bounded mutation test for the tokenizer: mutated texts (including invalid UTF-8), random id
// sequences and textually mutated tokenizer.json files must give a status or a result, never a
// crash. Fixed seed, so a failure reproduces.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "engine/tokenizer.h"

namespace tandem {
namespace {

std::string ReadFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  std::ostringstream contents;
  contents << file.rdbuf();
  return contents.str();
}

std::string Dir(const std::string& name) {
  return std::string(TANDEM_TEST_DATA_DIR) + "/tokenizers/" + name;
}

std::vector<std::string> GoldenTexts() {
  std::vector<std::string> texts;
  for (const std::string name : {"demo", "llama2", "qwen3"}) {
    const auto golden = nlohmann::json::parse(ReadFile(Dir(name) + "/golden.json"));
    for (const auto& c : golden.at("cases")) {
      texts.push_back(c.at("text").get<std::string>());
    }
  }
  return texts;
}

std::string MutateBytes(std::string text, std::mt19937& rng) {
  static const std::vector<std::string> kInserts = {"<|begin_of_text|>",
                                                    "<s>",
                                                    "</s>",
                                                    "\xE2\x82",
                                                    "\xF0\x9F\x8D",
                                                    "\xFF",
                                                    "\xC0\xAF",
                                                    "\xED\xA0\x80",
                                                    std::string(1, '\0'),
                                                    "▁",
                                                    "  ",
                                                    "\n\n",
                                                    "'ll",
                                                    "🍕",
                                                    "é"};
  const int mutations = 1 + static_cast<int>(rng() % 4);
  for (int m = 0; m < mutations; ++m) {
    const size_t pos = text.empty() ? 0 : rng() % (text.size() + 1);
    switch (rng() % 5) {
      case 0:  // overwrite a byte with anything
        if (!text.empty()) {
          text[rng() % text.size()] = static_cast<char>(rng() % 256);
        }
        break;
      case 1:
        text.insert(pos, 1, static_cast<char>(rng() % 256));
        break;
      case 2:
        if (!text.empty()) {
          text.erase(rng() % text.size(), 1 + rng() % 3);
        }
        break;
      case 3:
        text.insert(pos, kInserts[rng() % kInserts.size()]);
        break;
      default:
        text.resize(pos);
        break;
    }
  }
  return text;
}

void ExerciseTokenizer(const Tokenizer& tokenizer, const std::string& text, std::mt19937& rng) {
  for (const bool special : {false, true}) {
    const absl::StatusOr<std::vector<int32_t>> ids = tokenizer.Encode(text, special);
    if (!ids.ok()) {
      EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument) << ids.status();
      continue;
    }
    // Whatever Encode produced must decode, in full and streamed.
    const absl::StatusOr<std::string> decoded = tokenizer.Decode(*ids, false);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    IncrementalDetokenizer detokenizer(tokenizer, {}, false);
    std::string streamed;
    for (const int32_t id : *ids) {
      streamed += detokenizer.Push(id);
    }
    streamed += detokenizer.Flush();
    EXPECT_EQ(streamed, *decoded);
  }
  // Random ids, some out of range.
  std::vector<int32_t> ids(rng() % 12);
  for (int32_t& id : ids) {
    id = static_cast<int32_t>(rng() % (tokenizer.vocab_size() + 8)) - 4;
  }
  for (const bool skip : {false, true}) {
    (void)tokenizer.Decode(ids, skip);
    IncrementalDetokenizer detokenizer(tokenizer, ids, skip);
    for (const int32_t id : ids) {
      (void)detokenizer.Push(id);
    }
    (void)detokenizer.Flush();
  }
}

TEST(TokenizerFuzzTest, MutatedTextsAndIds) {
  std::vector<std::unique_ptr<Tokenizer>> tokenizers;
  for (const std::string name : {"demo", "llama2"}) {
    absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = Tokenizer::FromDir(Dir(name));
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizers.push_back(std::move(*tokenizer));
  }
  const std::vector<std::string> texts = GoldenTexts();
  std::mt19937 rng(20240611);
  for (int i = 0; i < 1500; ++i) {
    const std::string text = MutateBytes(texts[rng() % texts.size()], rng);
    ExerciseTokenizer(*tokenizers[i % tokenizers.size()], text, rng);
  }
}

// Textual mutations: most break the syntax and exercise the parser's error path.
std::string MutateText(std::string json, std::mt19937& rng) {
  const int mutations = 1 + static_cast<int>(rng() % 3);
  for (int m = 0; m < mutations && !json.empty(); ++m) {
    switch (rng() % 3) {
      case 0: {  // change a digit: ids, ranks, flags' neighbours
        const size_t at = json.find_first_of("0123456789", rng() % json.size());
        if (at != std::string::npos) {
          json[at] = static_cast<char>('0' + rng() % 10);
        }
        break;
      }
      case 1:
        json[rng() % json.size()] = static_cast<char>(rng() % 256);
        break;
      default:
        json.erase(rng() % json.size(), 1 + rng() % 40);
        break;
    }
  }
  return json;
}

void CollectPaths(const nlohmann::json& node, const std::string& path,
                  std::vector<std::string>* paths) {
  paths->push_back(path);
  if (node.is_object()) {
    for (const auto& [key, child] : node.items()) {
      std::string escaped = key;
      for (size_t at = escaped.find('~'); at != std::string::npos; at = escaped.find('~', at + 2)) {
        escaped.replace(at, 1, "~0");
      }
      for (size_t at = escaped.find('/'); at != std::string::npos; at = escaped.find('/', at + 2)) {
        escaped.replace(at, 1, "~1");
      }
      CollectPaths(child, path + "/" + escaped, paths);
    }
  } else if (node.is_array()) {
    for (size_t i = 0; i < node.size(); ++i) {
      CollectPaths(node[i], path + "/" + std::to_string(i), paths);
    }
  }
}

// Structural mutations (a hostile value somewhere in the tree, then dumped back to text), so
// that the loader's semantic checks are reached.
std::string MutateTree(const nlohmann::json& root, const std::vector<std::string>& pipeline_paths,
                       const std::vector<std::string>& model_paths, std::mt19937& rng) {
  static const std::vector<std::string> kValues = {"\"Metaspace\"",
                                                   "\"Sequence\"",
                                                   "\"ByteLevel\"",
                                                   "\"Split\"",
                                                   "null",
                                                   "true",
                                                   "[]",
                                                   "{}",
                                                   "-1",
                                                   "99999999",
                                                   "2047",
                                                   "\"\"",
                                                   "{\"Regex\": \"(\"}",
                                                   "{\"String\": \"a\"}",
                                                   "0",
                                                   "1e9",
                                                   "\"Strip\"",
                                                   "\"Isolated\"",
                                                   "\"<0x41>\"",
                                                   "[\"a\", \"b\"]",
                                                   "\"\\u2581\""};
  nlohmann::json mutated = root;
  const int mutations = 1 + static_cast<int>(rng() % 2);
  for (int m = 0; m < mutations; ++m) {
    const auto& paths = rng() % 4 == 0 ? model_paths : pipeline_paths;
    const nlohmann::json::json_pointer pointer(paths[rng() % paths.size()]);
    if (!mutated.contains(pointer)) {
      continue;  // an earlier mutation removed it
    }
    mutated[pointer] = nlohmann::json::parse(kValues[rng() % kValues.size()]);
  }
  return mutated.dump();
}

TEST(TokenizerFuzzTest, MutatedTokenizerJson) {
  const std::string original = ReadFile(Dir("demo") + "/tokenizer.json");
  const std::string config = ReadFile(Dir("demo") + "/tokenizer_config.json");
  ASSERT_FALSE(original.empty());
  const nlohmann::json root = nlohmann::json::parse(original);
  std::vector<std::string> pipeline_paths;
  std::vector<std::string> model_paths;
  for (const auto& [key, child] : root.items()) {
    CollectPaths(child, "/" + key, key == "model" ? &model_paths : &pipeline_paths);
  }
  const std::vector<std::string> texts = GoldenTexts();
  std::mt19937 rng(7);
  int loaded = 0;
  for (int i = 0; i < 500; ++i) {
    const std::string mutated =
        i % 3 == 0 ? MutateText(original, rng) : MutateTree(root, pipeline_paths, model_paths, rng);
    absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer =
        Tokenizer::FromJson(mutated, i % 5 == 0 ? MutateText(config, rng) : config);
    if (!tokenizer.ok()) {
      EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument)
          << tokenizer.status();
      continue;
    }
    ++loaded;
    ExerciseTokenizer(**tokenizer, texts[rng() % texts.size()], rng);
  }
  // The mutations must leave a fair share loadable, or the test exercises only the parser.
  EXPECT_GT(loaded, 50);
}

}  // namespace
}  // namespace tandem
