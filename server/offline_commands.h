// The offline subcommands of `tandem`: generate, tokenize, make-model.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "engine/engine.h"

namespace tandem {

struct GenerateFlags {
  EngineOptions engine;
  std::optional<std::string> prompt;
  std::vector<int32_t> token_ids;
  bool no_special = false;  // do not add BOS when tokenizing --prompt
  SamplingParams sampling;
  bool json = false;
  bool logits = false;  // with --json: last_prompt_logits
};

struct TokenizeFlags {
  std::string model_dir;
  std::string text;
  bool add_special = false;
  bool json = false;
};

struct MakeModelFlags {
  std::string preset = "demo";
  std::string out;
  std::string dtype = "bf16";
  std::string architecture;  // overrides the preset's
  uint64_t seed = 1;
  int32_t layers = 0;        // overrides the preset's when > 0
};

// Each returns the process exit code and prints errors to stderr.
int RunGenerate(const GenerateFlags& flags);
int RunTokenize(const TokenizeFlags& flags);
int RunMakeModel(const MakeModelFlags& flags);

}  // namespace tandem
