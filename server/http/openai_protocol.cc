// OpenAI completions <-> tandem.v1: see openai_protocol.h.
#include "server/http/openai_protocol.h"

#include <cmath>
#include <cstdio>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>

namespace tandem::http {
namespace {

using nlohmann::json;

ApiError Bad(const std::string& param, const std::string& message) {
  ApiError e;
  e.status = 400;
  e.param = param;
  e.message = param.empty() ? message : param + ": " + message;
  return e;
}

// Unset when absent or null.
const json* Field(const json& body, const char* name) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) {
    return nullptr;
  }
  return &*it;
}

// An integer field; a float with an integral value is accepted (some clients send 16.0).
std::optional<ApiError> GetInt(const json& body, const char* name, int64_t lo, int64_t hi,
                               std::optional<int64_t>* out) {
  const json* v = Field(body, name);
  if (v == nullptr) {
    return std::nullopt;
  }
  int64_t x = 0;
  if (v->is_number_integer()) {
    if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(hi)) {
      return Bad(name, "out of range");
    }
    x = v->get<int64_t>();
  } else if (v->is_number_float()) {
    const double d = v->get<double>();
    if (!std::isfinite(d) || std::floor(d) != d || d < static_cast<double>(lo) ||
        d > static_cast<double>(hi)) {
      return Bad(name, "must be an integer");
    }
    x = static_cast<int64_t>(d);
  } else {
    return Bad(name, "must be an integer");
  }
  if (x < lo || x > hi) {
    return Bad(name, "out of range");
  }
  *out = x;
  return std::nullopt;
}

std::optional<ApiError> GetFloat(const json& body, const char* name, float* out, bool* present) {
  const json* v = Field(body, name);
  if (v == nullptr) {
    return std::nullopt;
  }
  if (!v->is_number()) {
    return Bad(name, "must be a number");
  }
  *out = static_cast<float>(v->get<double>());
  *present = true;
  return std::nullopt;
}

std::optional<ApiError> GetBool(const json& body, const char* name, std::optional<bool>* out) {
  const json* v = Field(body, name);
  if (v == nullptr) {
    return std::nullopt;
  }
  if (!v->is_boolean()) {
    return Bad(name, "must be a boolean");
  }
  *out = v->get<bool>();
  return std::nullopt;
}

std::optional<ApiError> ParsePrompt(const json& body, CompletionRequest* out) {
  const json* p = Field(body, "prompt");
  if (p == nullptr) {
    return Bad("prompt", "required");
  }
  if (p->is_string()) {
    out->generate.set_text(p->get<std::string>());
    out->generate.set_add_special_tokens(true);
    return std::nullopt;
  }
  if (!p->is_array()) {
    return Bad("prompt", "must be a string or an array of token ids");
  }
  if (p->empty()) {
    return Bad("prompt", "must not be empty");
  }
  // One prompt spelled as a one-element batch (["text"] or [[ids]]) is accepted; a real batch
  // is not: one completion per request.
  if (p->size() == 1 && ((*p)[0].is_string() || (*p)[0].is_array())) {
    json one = body;
    one["prompt"] = (*p)[0];
    if ((*p)[0].is_array() && (*p)[0].empty()) {
      return Bad("prompt", "must not be empty");
    }
    if ((*p)[0].is_array() && !(*p)[0][0].is_number_integer()) {
      return Bad("prompt", "one prompt per request (n = 1; no batches)");
    }
    return ParsePrompt(one, out);
  }
  auto* ids = out->generate.mutable_token_ids();
  for (const json& e : *p) {
    if (e.is_string() || e.is_array()) {
      return Bad("prompt", "one prompt per request (n = 1; no batches)");
    }
    if (!e.is_number_integer() || e.get<int64_t>() < 0 ||
        e.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      return Bad("prompt", "token ids must be non-negative integers");
    }
    ids->add_ids(static_cast<int32_t>(e.get<int64_t>()));
  }
  return std::nullopt;
}

std::optional<ApiError> ParseSampling(const json& body, v1::SamplingParams* s,
                                      CompletionRequest* out) {
  constexpr int64_t kI32 = std::numeric_limits<int32_t>::max();
  std::optional<int64_t> i;
  std::optional<bool> b;
  if (out->chat) {
    // Chat spells it max_completion_tokens (max_tokens is its deprecated alias); unset, the
    // answer may run to the end of the context.
    if (auto e = GetInt(body, "max_completion_tokens", std::numeric_limits<int32_t>::min(), kI32,
                        &i)) {
      return e;
    }
    if (!i) {
      if (auto e = GetInt(body, "max_tokens", std::numeric_limits<int32_t>::min(), kI32, &i)) {
        return e;
      }
    }
    if (i) {
      s->set_max_tokens(static_cast<int32_t>(*i));
    } else {
      out->generate.set_max_tokens_to_context(true);
    }
  } else {
    if (auto e = GetInt(body, "max_tokens", std::numeric_limits<int32_t>::min(), kI32, &i)) {
      return e;
    }
    s->set_max_tokens(i ? static_cast<int32_t>(*i) : 16);  // OpenAI's default
  }
  i.reset();
  if (auto e = GetInt(body, "top_k", std::numeric_limits<int32_t>::min(), kI32, &i)) return e;
  if (i) s->set_top_k(static_cast<int32_t>(*i));
  i.reset();
  if (auto e = GetInt(body, "min_tokens", std::numeric_limits<int32_t>::min(), kI32, &i)) return e;
  if (i) s->set_min_tokens(static_cast<int32_t>(*i));
  i.reset();
  if (auto e = GetInt(body, "seed", 0, std::numeric_limits<int64_t>::max(), &i)) return e;
  if (i) s->set_seed(static_cast<uint64_t>(*i));
  i.reset();
  if (out->chat) {
    // Chat: logprobs is a switch, top_logprobs the count of alternatives.
    if (auto e = GetBool(body, "logprobs", &b)) return e;
    if (auto e = GetInt(body, "top_logprobs", 0, kI32, &i)) return e;
    if (b.value_or(false)) {
      s->set_logprobs(static_cast<int32_t>(i.value_or(0)));
      out->logprobs = true;
    } else if (i && *i > 0) {
      return Bad("top_logprobs", "needs logprobs: true");
    }
    b.reset();
    i.reset();
  } else {
    // Legacy completions: logprobs is the top-N count (0: the chosen token's only).
    if (auto e = GetInt(body, "logprobs", 0, kI32, &i)) return e;
    if (i) {
      s->set_logprobs(static_cast<int32_t>(*i));
      out->logprobs = true;
    }
  }
  struct FloatField {
    const char* name;
    void (v1::SamplingParams::*set)(float);
  };
  for (const FloatField& ff :
       {FloatField{"temperature", &v1::SamplingParams::set_temperature},
        FloatField{"top_p", &v1::SamplingParams::set_top_p},
        FloatField{"min_p", &v1::SamplingParams::set_min_p},
        FloatField{"presence_penalty", &v1::SamplingParams::set_presence_penalty},
        FloatField{"frequency_penalty", &v1::SamplingParams::set_frequency_penalty},
        FloatField{"repetition_penalty", &v1::SamplingParams::set_repetition_penalty}}) {
    float value = 0;
    bool present = false;
    if (auto e = GetFloat(body, ff.name, &value, &present)) return e;
    if (present) (s->*ff.set)(value);
  }
  if (auto e = GetBool(body, "ignore_eos", &b)) return e;
  if (b) s->set_ignore_eos(*b);
  if (const json* stop = Field(body, "stop")) {
    if (stop->is_string()) {
      s->add_stop(stop->get<std::string>());
    } else if (stop->is_array()) {
      for (const json& e : *stop) {
        if (!e.is_string()) return Bad("stop", "must be a string or an array of strings");
        s->add_stop(e.get<std::string>());
      }
    } else {
      return Bad("stop", "must be a string or an array of strings");
    }
  }
  return std::nullopt;
}

// The fields of both endpoints after the prompt: sampling, streaming, the model.
std::optional<ApiError> ParseCommon(const json& j, CompletionRequest* out) {
  if (auto e = ParseSampling(j, out->generate.mutable_sampling(), out)) return e;
  std::optional<bool> b;
  if (auto e = GetBool(j, "stream", &b)) return e;
  out->stream = b.value_or(false);
  if (const json* so = Field(j, "stream_options")) {
    if (!so->is_object()) return Bad("stream_options", "must be an object");
    b.reset();
    if (auto e = GetBool(*so, "include_usage", &b)) {
      e->param = "stream_options.include_usage";
      return e;
    }
    out->include_usage = b.value_or(false);
  }
  out->generate.set_model(out->model);
  return std::nullopt;
}

}  // namespace

std::string ErrorJson(const ApiError& e) {
  json err = {{"message", e.message},
              {"type", e.type},
              {"param", e.param.empty() ? json(nullptr) : json(e.param)},
              {"code", e.code.empty() ? json(nullptr) : json(e.code)}};
  return json{{"error", std::move(err)}}.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::optional<ApiError> ParseCompletionRequest(std::string_view body, CompletionRequest* out) {
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return Bad("", "the body is not valid JSON");
  }
  if (!j.is_object()) {
    return Bad("", "the body must be a JSON object");
  }
  if (const json* m = Field(j, "model")) {
    if (!m->is_string()) return Bad("model", "must be a string");
    out->model = m->get<std::string>();
  }
  // Features Tandem does not offer: refused by name rather than silently ignored.
  std::optional<int64_t> n;
  for (const char* name : {"n", "best_of"}) {
    n.reset();
    if (auto e = GetInt(j, name, std::numeric_limits<int64_t>::min(),
                        std::numeric_limits<int64_t>::max(), &n)) {
      return e;
    }
    if (n && *n != 1) return Bad(name, "only 1 is supported");
  }
  std::optional<bool> b;
  if (auto e = GetBool(j, "echo", &b)) return e;
  if (b && *b) return Bad("echo", "not supported");
  if (const json* s = Field(j, "suffix")) {
    if (!s->is_string() || !s->get<std::string>().empty()) return Bad("suffix", "not supported");
  }
  if (auto e = ParsePrompt(j, out)) return e;
  return ParseCommon(j, out);
}

std::optional<ApiError> ParseChatRequest(std::string_view body, const ChatRenderer& chat,
                                         CompletionRequest* out) {
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return Bad("", "the body is not valid JSON");
  }
  if (!j.is_object()) {
    return Bad("", "the body must be a JSON object");
  }
  out->chat = true;
  if (const json* m = Field(j, "model")) {
    if (!m->is_string()) return Bad("model", "must be a string");
    out->model = m->get<std::string>();
  }
  std::optional<int64_t> n;
  if (auto e = GetInt(j, "n", std::numeric_limits<int64_t>::min(),
                      std::numeric_limits<int64_t>::max(), &n)) {
    return e;
  }
  if (n && *n != 1) return Bad("n", "only 1 is supported");
  if (const json* rf = Field(j, "response_format")) {
    if (!rf->is_object() || rf->value("type", "") != "text") {
      return Bad("response_format", "only {\"type\": \"text\"} is supported");
    }
  }
  if (const json* tc = Field(j, "tool_choice")) {
    // Tools reach the template (the model sees them); tool calls come back as text: forcing a
    // call would need constrained decoding, which Tandem does not have.
    if (!tc->is_string() || (*tc != "none" && *tc != "auto")) {
      return Bad("tool_choice", "only \"none\" and \"auto\" are supported");
    }
  }
  std::optional<bool> b;
  if (auto e = GetBool(j, "continue_final_message", &b)) return e;
  if (b && *b) return Bad("continue_final_message", "not supported");
  b.reset();
  if (auto e = GetBool(j, "add_generation_prompt", &b)) return e;
  const bool add_generation_prompt = b.value_or(true);

  // The template sees the conversation with the client's key order (tools | tojson prints it).
  const nlohmann::ordered_json ordered =
      nlohmann::ordered_json::parse(body, nullptr, /*allow_exceptions=*/false);
  nlohmann::ordered_json context = nlohmann::ordered_json::object();
  const auto messages = ordered.find("messages");
  if (messages == ordered.end() || messages->is_null()) return Bad("messages", "required");
  if (!messages->is_array() || messages->empty()) {
    return Bad("messages", "must be a non-empty array of messages");
  }
  nlohmann::ordered_json& rendered_messages = context["messages"] = nlohmann::ordered_json::array();
  for (size_t i = 0; i < messages->size(); ++i) {
    const auto& m = (*messages)[i];
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) return Bad(where, "must be an object");
    const auto role = m.find("role");
    if (role == m.end() || !role->is_string() || role->get<std::string>().empty()) {
      return Bad(where + ".role", "must be a non-empty string");
    }
    nlohmann::ordered_json msg = m;
    const auto content = m.find("content");
    if (content != m.end() && content->is_array()) {
      // Text parts become one string, joined by newlines (as vLLM does); nothing else is read.
      std::string text;
      for (size_t k = 0; k < content->size(); ++k) {
        const auto& part = (*content)[k];
        if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
            !part["text"].is_string()) {
          return Bad(where + ".content",
                     "only text parts ({\"type\": \"text\", \"text\": ...}) are supported");
        }
        if (k > 0) text += "\n";
        text += part["text"].get<std::string>();
      }
      msg["content"] = text;
    } else if (content != m.end() && !content->is_string() && !content->is_null()) {
      return Bad(where + ".content", "must be a string, an array of text parts, or null");
    }
    rendered_messages.push_back(std::move(msg));
  }
  if (const auto tools = ordered.find("tools"); tools != ordered.end() && !tools->is_null()) {
    if (!tools->is_array()) return Bad("tools", "must be an array");
    context["tools"] = *tools;
  }
  if (const auto kw = ordered.find("chat_template_kwargs"); kw != ordered.end() && !kw->is_null()) {
    if (!kw->is_object()) return Bad("chat_template_kwargs", "must be an object");
    for (const auto& [key, value] : kw->items()) context[key] = value;
  }
  context["add_generation_prompt"] = add_generation_prompt;
  context["bos_token"] = chat.bos_token;
  context["eos_token"] = chat.eos_token;

  if (chat.chat_template == nullptr) {
    ApiError e = Bad("", chat.unavailable.empty() ? "this model has no chat template"
                                                  : chat.unavailable);
    return e;
  }
  absl::StatusOr<std::string> prompt = chat.chat_template->Render(context);
  if (!prompt.ok()) {
    // The template's own raise_exception text (e.g. "roles must alternate") is the message.
    return Bad("messages", "the chat template refused them: " + std::string(prompt.status().message()));
  }
  out->generate.set_text(*std::move(prompt));
  out->generate.set_add_special_tokens(false);
  return ParseCommon(j, out);
}

ApiError FromGrpcError(const grpc::Status& s) {
  ApiError e;
  e.message = s.error_message();
  switch (s.error_code()) {
    case grpc::StatusCode::INVALID_ARGUMENT: {
      e.status = 400;
      // The router's messages start with the field: "max_tokens: must be >= 1".
      const size_t colon = e.message.find(':');
      if (colon != std::string::npos && colon > 0 && e.message.find(' ') > colon) {
        e.param = e.message.substr(0, colon);
        // The API's prompt oneof ("prompt.text", "prompt.token_ids") is OpenAI's `prompt`.
        if (e.param.rfind("prompt.", 0) == 0) e.param = "prompt";
      }
      break;
    }
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      e.status = 429;
      e.type = "rate_limit_error";
      break;
    case grpc::StatusCode::UNAVAILABLE:
      e.status = 503;
      e.type = "service_unavailable_error";
      break;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      e.status = 504;
      e.type = "timeout_error";
      break;
    case grpc::StatusCode::NOT_FOUND:
      e.status = 404;
      e.type = "not_found_error";
      break;
    default:
      e.status = 500;
      e.type = "server_error";
      break;
  }
  if (e.message.empty()) e.message = "the router returned status " + std::to_string(s.error_code());
  return e;
}

void CompletionPiece::Append(const v1::GenerateResponse& r) {
  text += r.text();
  token_ids.insert(token_ids.end(), r.token_ids().begin(), r.token_ids().end());
  logprobs.insert(logprobs.end(), r.logprobs().begin(), r.logprobs().end());
  if (!r.finish_reason().empty()) finish_reason = r.finish_reason();
}

namespace {

json UsageJson(const v1::Usage& usage) {
  return {{"prompt_tokens", usage.prompt_tokens()},
          {"completion_tokens", usage.completion_tokens()},
          {"total_tokens", usage.prompt_tokens() + usage.completion_tokens()}};
}

// Chat's logprobs object. The API carries token ids, not per-token text: `token` is the id as a
// decimal string and `bytes` is null.
json ChatLogprobsJson(const CompletionPiece& piece) {
  json content = json::array();
  for (size_t i = 0; i < piece.token_ids.size(); ++i) {
    json entry = {{"token", std::to_string(piece.token_ids[i])},
                  {"logprob", nullptr},
                  {"bytes", nullptr},
                  {"top_logprobs", json::array()}};
    if (i < piece.logprobs.size()) {
      entry["logprob"] = piece.logprobs[i].logprob();
      for (const v1::TopLogprob& tl : piece.logprobs[i].top()) {
        entry["top_logprobs"].push_back({{"token", std::to_string(tl.token_id())},
                                         {"logprob", tl.logprob()},
                                         {"bytes", nullptr}});
      }
    }
    content.push_back(std::move(entry));
  }
  return {{"content", std::move(content)}};
}

json FinishJson(const CompletionPiece& piece) {
  return piece.finish_reason.empty() ? json(nullptr) : json(piece.finish_reason);
}

}  // namespace

std::string ChatChunkJson(const CompletionIdentity& who, const CompletionPiece& piece,
                          bool logprobs, bool first) {
  json delta = json::object();
  if (first) delta["role"] = "assistant";
  if (!piece.text.empty() || (first && piece.finish_reason.empty())) delta["content"] = piece.text;
  json choice = {{"index", 0},
                 {"delta", std::move(delta)},
                 {"logprobs", logprobs && !piece.token_ids.empty() ? ChatLogprobsJson(piece)
                                                                   : json(nullptr)},
                 {"finish_reason", FinishJson(piece)}};
  json out = {{"id", who.id},
              {"object", "chat.completion.chunk"},
              {"created", who.created},
              {"model", who.model},
              {"choices", json::array({std::move(choice)})}};
  return out.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string CompletionJson(const CompletionIdentity& who, const CompletionPiece& piece,
                           bool logprobs, const v1::Usage* usage) {
  if (who.chat) {
    json choice = {{"index", 0},
                   {"message", {{"role", "assistant"}, {"content", piece.text}}},
                   {"logprobs", logprobs ? ChatLogprobsJson(piece) : json(nullptr)},
                   {"finish_reason", FinishJson(piece)}};
    json out = {{"id", who.id},
                {"object", "chat.completion"},
                {"created", who.created},
                {"model", who.model},
                {"choices", json::array({std::move(choice)})}};
    if (usage != nullptr) out["usage"] = UsageJson(*usage);
    return out.dump(-1, ' ', false, json::error_handler_t::replace);
  }
  json choice = {
      {"index", 0},
      {"text", piece.text},
      {"logprobs", nullptr},
      {"finish_reason", piece.finish_reason.empty() ? json(nullptr) : json(piece.finish_reason)}};
  if (logprobs) {
    // Legacy completions shape. The API carries token ids, not per-token text: `tokens` and the
    // keys of `top_logprobs` are the ids as decimal strings; `text_offset` is omitted.
    json tokens = json::array(), token_logprobs = json::array(), top = json::array();
    for (size_t i = 0; i < piece.token_ids.size(); ++i) {
      tokens.push_back(std::to_string(piece.token_ids[i]));
      if (i < piece.logprobs.size()) {
        token_logprobs.push_back(piece.logprobs[i].logprob());
        json t = json::object();
        for (const v1::TopLogprob& tl : piece.logprobs[i].top()) {
          t[std::to_string(tl.token_id())] = tl.logprob();
        }
        top.push_back(std::move(t));
      } else {
        token_logprobs.push_back(nullptr);
        top.push_back(nullptr);
      }
    }
    choice["logprobs"] = {{"tokens", std::move(tokens)},
                          {"token_logprobs", std::move(token_logprobs)},
                          {"top_logprobs", std::move(top)}};
  }
  json out = {{"id", who.id},
              {"object", "text_completion"},
              {"created", who.created},
              {"model", who.model},
              {"choices", json::array({std::move(choice)})}};
  if (usage != nullptr) out["usage"] = UsageJson(*usage);
  return out.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string UsageChunkJson(const CompletionIdentity& who, const v1::Usage& usage) {
  json out = {{"id", who.id},
              {"object", who.chat ? "chat.completion.chunk" : "text_completion"},
              {"created", who.created},
              {"model", who.model},
              {"choices", json::array()},
              {"usage", UsageJson(usage)}};
  return out.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string ModelsJson(const v1::ListModelsResponse& models, int64_t created) {
  json data = json::array();
  for (const v1::ModelCard& m : models.models()) {
    data.push_back({{"id", m.id()},
                    {"object", "model"},
                    {"created", created},
                    {"owned_by", "tandem"},
                    {"max_model_len", m.max_model_len()}});
  }
  return json{{"object", "list"}, {"data", std::move(data)}}.dump(-1, ' ', false,
                                                                  json::error_handler_t::replace);
}

std::string NewCompletionId(bool chat) {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  char buf[48];
  std::snprintf(buf, sizeof(buf), "%s-%016llx%08llx", chat ? "chatcmpl" : "cmpl",
                static_cast<unsigned long long>(rng()),
                static_cast<unsigned long long>(rng() & 0xffffffffULL));
  return buf;
}

}  // namespace tandem::http
