// tandem generate / tokenize / make-model.
#include "server/offline_commands.h"

#include <cstdio>
#include <iostream>

#include <nlohmann/json.hpp>

#include "engine/model_factory.h"
#include "engine/tokenizer.h"

namespace tandem {
namespace {

using json = nlohmann::json;

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
  return s.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

}  // namespace

int RunGenerate(const GenerateFlags& flags) {
  auto engine = Engine::Create(flags.engine);
  if (!engine.ok()) {
    return Fail(engine.status());
  }
  Engine& e = **engine;
  SequenceRequest req;
  req.sampling = flags.sampling;
  req.want_prompt_logits = flags.json && flags.logits;
  if (flags.prompt) {
    if (e.tokenizer() == nullptr) {
      return Fail(absl::InvalidArgumentError(
          "--prompt needs a tokenizer.json in the model folder; use --token-ids"));
    }
    auto ids = e.tokenizer()->Encode(*flags.prompt, !flags.no_special);
    if (!ids.ok()) {
      return Fail(ids.status());
    }
    req.prompt_ids = *std::move(ids);
  } else {
    req.prompt_ids = flags.token_ids;
  }
  const std::vector<int32_t> prompt_ids = req.prompt_ids;
  auto result = e.Generate(std::move(req));
  if (!result.ok()) {
    return Fail(result.status());
  }
  const double prefill_tps =
      result->prefill_seconds > 0 ? prompt_ids.size() / result->prefill_seconds : 0;
  const size_t decoded = result->output_ids.size() > 0 ? result->output_ids.size() - 1 : 0;
  const double decode_tps = result->decode_seconds > 0 ? decoded / result->decode_seconds : 0;
  if (flags.json) {
    json out = {{"prompt_ids", prompt_ids},
                {"output_ids", result->output_ids},
                {"text", result->text},
                {"finish_reason", FinishReasonName(result->finish)},
                {"prefill_seconds", result->prefill_seconds},
                {"decode_seconds", result->decode_seconds},
                {"prefill_tokens_per_second", prefill_tps},
                {"decode_tokens_per_second", decode_tps}};
    if (flags.sampling.logprobs >= 0) {
      out["logprobs"] = result->logprobs;
    }
    if (flags.logits) {
      out["last_prompt_logits"] = result->prompt_logits;
    }
    std::cout << out.dump(-1, ' ', false, json::error_handler_t::replace) << std::endl;
    return 0;
  }
  if (e.tokenizer() != nullptr) {
    std::cout << result->text << std::endl;
  } else {
    for (size_t i = 0; i < result->output_ids.size(); ++i) {
      std::cout << (i ? " " : "") << result->output_ids[i];
    }
    std::cout << std::endl;
  }
  std::fprintf(stderr,
               "[tandem] %zu prompt tokens: prefill %.1f tok/s; %zu generated: decode %.1f tok/s "
               "(finish: %s)\n",
               prompt_ids.size(), prefill_tps, result->output_ids.size(), decode_tps,
               FinishReasonName(result->finish));
  return 0;
}

int RunTokenize(const TokenizeFlags& flags) {
  auto tok = Tokenizer::FromDir(flags.model_dir);
  if (!tok.ok()) {
    return Fail(tok.status());
  }
  auto ids = (*tok)->Encode(flags.text, flags.add_special);
  if (!ids.ok()) {
    return Fail(ids.status());
  }
  if (flags.json) {
    std::cout << json{{"ids", *ids}}.dump() << std::endl;
  } else {
    for (size_t i = 0; i < ids->size(); ++i) std::cout << (i ? " " : "") << (*ids)[i];
    std::cout << std::endl;
  }
  return 0;
}

int RunMakeModel(const MakeModelFlags& flags) {
  auto spec = RandomModelPreset(flags.preset);
  if (!spec.ok()) {
    return Fail(spec.status());
  }
  auto dtype = ParseDType(flags.dtype);
  if (!dtype) {
    return Fail(absl::InvalidArgumentError("--dtype must be bf16, f16 or f32"));
  }
  spec->dtype = *dtype;
  spec->seed = flags.seed;
  if (!flags.architecture.empty()) spec->architecture = flags.architecture;
  if (flags.layers > 0) spec->num_layers = flags.layers;
  if (absl::Status s = WriteRandomModel(flags.out, *spec); !s.ok()) {
    return Fail(s);
  }
  std::fprintf(stderr, "[tandem] wrote a random %s model to %s (its text is noise)\n",
               flags.preset.c_str(), flags.out.c_str());
  return 0;
}

}  // namespace tandem
