// The `tandem` binary's offline subcommands as scripts use them: JSON shapes, golden ids, errors.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

namespace {

struct RunResult {
  int exit_code = -1;
  std::string out;
};

// Runs the binary with arguments (no shell interpolation of user data: arguments are ours).
RunResult RunTandem(const std::string& args) {
  RunResult r;
  const std::string cmd = std::string(TANDEM_BINARY) + " " + args + " 2>/dev/null";
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

nlohmann::json ReadJson(const std::string& path) {
  std::ifstream f(path);
  return nlohmann::json::parse(f);
}

const std::string kData = TANDEM_TEST_DATA_DIR;

TEST(CliTest, GenerateJsonWithLogitsMatchesTheGolden) {
  const std::string dir = kData + "/models/llama3_gqa_bf16";
  const auto golden = ReadJson(dir + "/golden.json")["cases"][0];
  std::string ids;
  for (int id : golden["input_ids"]) ids += (ids.empty() ? "" : ",") + std::to_string(id);
  const RunResult r = RunTandem("generate --model " + dir + " --token-ids " + ids +
                          " --temperature 0 --ignore-eos --max-tokens " +
                          std::to_string(golden["greedy_ids"].size()) + " --json --logits");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const auto out = nlohmann::json::parse(r.out);
  EXPECT_EQ(out["output_ids"], golden["greedy_ids"]);
  EXPECT_EQ(out["last_prompt_logits"].size(), golden["last_logits"].size());
  EXPECT_TRUE(out.contains("text"));
  EXPECT_EQ(out["finish_reason"], "length");
}

TEST(CliTest, GenerateFromTextOnTheDemoModel) {
  const RunResult r = RunTandem(std::string("generate --model ") + TANDEM_DEMO_MODEL_DIR +
                          " --prompt 'The President said that' --temperature 0 --ignore-eos"
                          " --max-tokens 16 --json");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const auto out = nlohmann::json::parse(r.out);
  const auto golden = ReadJson(std::string(TANDEM_DEMO_MODEL_DIR) + "/golden.json")["cases"][0];
  EXPECT_EQ(out["prompt_ids"], golden["input_ids"]);
  EXPECT_EQ(out["output_ids"], golden["greedy_ids"]);
  EXPECT_EQ(out["text"], golden["greedy_text"]);
}

TEST(CliTest, TokenizeJsonOnATokenizerOnlyFolder) {
  const std::string dir = kData + "/tokenizers/llama3_1";
  const auto golden = ReadJson(dir + "/golden.json")["cases"][1];
  const std::string text = golden["text"];
  if (text.find('\'') != std::string::npos) GTEST_SKIP() << "case needs shell quoting";
  const RunResult r = RunTandem("tokenize --model " + dir + " --text '" + text + "' --add-special --json");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(nlohmann::json::parse(r.out)["ids"], golden["ids_with_special"]);
}

TEST(CliTest, BadInputExitsWithTwo) {
  const std::string dir = kData + "/models/llama2_mha_f16";
  EXPECT_EQ(RunTandem("generate --model " + dir + " --token-ids 1,99999").exit_code, 2);
  EXPECT_EQ(RunTandem("generate --model " + dir + " --token-ids 1,2 --top-p 0").exit_code, 2);
  EXPECT_EQ(RunTandem("generate --model /nonexistent --token-ids 1").exit_code, 1);
  EXPECT_EQ(RunTandem("generate --model " + dir + " --prompt hello").exit_code, 2);  // no tokenizer
}

TEST(CliTest, MakeModelWritesALoadableFolder) {
  const std::string dir = ::testing::TempDir() + "/cli_demo_model";
  ASSERT_EQ(RunTandem("make-model --preset demo --out " + dir).exit_code, 0);
  const RunResult r = RunTandem("generate --model " + dir + " --prompt hi --max-tokens 3 --seed 1 --json");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(nlohmann::json::parse(r.out)["output_ids"].size(), 3u);
}

}  // namespace
