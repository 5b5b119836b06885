// Generate request validation: see prepare.h.
#include "router/internal/prepare.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/sampling.h"
#include "engine/tokenizer.h"
#include "proto/convert.h"

namespace tandem {
namespace {

constexpr int32_t kDefaultMaxTokens = 16;

absl::Status Bad(std::string_view field, std::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat(std::string(field), ": ", std::string(why)));
}

}  // namespace

std::string Utf8Error(std::string_view s) {
  const auto bad = FindInvalidUtf8(s);
  return bad ? absl::StrCat("invalid UTF-8 at byte ", *bad) : "";
}

absl::Status CheckModelName(const std::string& requested, const ServedModel& model) {
  if (!requested.empty() && requested != model.name) {
    return Bad("model", absl::StrCat("unknown model '", requested, "'; this server serves '",
                                     model.name, "'"));
  }
  return absl::OkStatus();
}

absl::StatusOr<PreparedRequest> PrepareGenerate(const v1::GenerateRequest& request,
                                                const ServedModel& model) {
  if (absl::Status s = CheckModelName(request.model(), model); !s.ok()) {
    return s;
  }
  PreparedRequest out;
  const int64_t context = model.max_model_len();
  const int32_t vocab = model.vocab_size();
  switch (request.prompt_case()) {
    case v1::GenerateRequest::kText: {
      if (request.text().empty()) {
        return Bad("prompt", "must not be empty");
      }
      if (const std::string err = Utf8Error(request.text()); !err.empty()) {
        return Bad("prompt.text", err);
      }
      if (model.tokenizer == nullptr) {
        return Bad("prompt.text", "model has no tokenizer; send prompt.token_ids");
      }
      // Tokenizing costs about one pass over the text, and gRPC bounds the message size.
      auto ids = model.tokenizer->Encode(request.text(), request.add_special_tokens());
      if (!ids.ok()) {
        return Bad("prompt.text", std::string(ids.status().message()));
      }
      out.prompt_ids = *std::move(ids);
      break;
    }
    case v1::GenerateRequest::kTokenIds: {
      const auto& ids = request.token_ids().ids();
      for (int i = 0; i < ids.size(); ++i) {
        if (ids[i] < 0 || ids[i] >= vocab) {
          return Bad("prompt.token_ids",
                     absl::StrCat("id ", ids[i], " at position ", i,
                                  " is outside the vocabulary [0, ", vocab, ")"));
        }
      }
      out.prompt_ids.assign(ids.begin(), ids.end());
      break;
    }
    case v1::GenerateRequest::PROMPT_NOT_SET:
      break;
  }
  if (out.prompt_ids.empty()) {
    return Bad("prompt", "must not be empty");
  }
  const int64_t prompt_len = static_cast<int64_t>(out.prompt_ids.size());
  if (prompt_len >= context) {
    return Bad("prompt",
               absl::StrCat(prompt_len, " tokens leave no room in the model's context of ", context,
                            " tokens"));
  }

  const v1::SamplingParams& given = request.sampling();
  SamplingParams params = SamplingFromProto(given);
  if (given.has_max_tokens()) {
    if (given.max_tokens() < 1) {
      return Bad("max_tokens", "must be >= 1");
    }
    if (prompt_len + given.max_tokens() > context) {
      return Bad("max_tokens",
                 absl::StrCat("prompt (", prompt_len, " tokens) + max_tokens (", given.max_tokens(),
                              ") exceeds the model's context of ", context, " tokens"));
    }
  } else {
    const int64_t room = context - prompt_len;
    params.max_tokens = static_cast<int32_t>(
        request.max_tokens_to_context() ? room : std::min<int64_t>(kDefaultMaxTokens, room));
  }
  if (absl::Status s = ValidateSamplingParams(params, vocab); !s.ok()) {
    return s;
  }
  for (const std::string& stop : params.stop) {
    if (const std::string err = Utf8Error(stop); !err.empty()) {
      return Bad("stop", err);
    }
  }
  if (!params.stop.empty() && model.tokenizer == nullptr) {
    return Bad("stop", "model has no tokenizer, so stop strings cannot match");
  }
  out.max_tokens = params.max_tokens;
  out.logprobs = params.logprobs;
  out.stop = params.stop;
  out.sampling = given;
  out.sampling.set_max_tokens(params.max_tokens);
  return out;
}

}  // namespace tandem
