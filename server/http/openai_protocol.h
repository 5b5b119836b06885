// OpenAI wire shapes <-> tandem.v1 messages, and the one place where gRPC statuses become HTTP
// errors for the gateway. No I/O here: openai_gateway.cc does the HTTP and the calls.
#pragma once

#include <grpcpp/support/status.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/chat_template.h"
#include "tandem/v1/tandem.pb.h"

namespace tandem::http {

// An error in OpenAI's shape: {"error":{"message","type","param","code"}}.
struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // empty: null
  std::string code;   // empty: null
};
std::string ErrorJson(const ApiError& e);

// A parsed POST /v1/completions or /v1/chat/completions body.
struct CompletionRequest {
  v1::GenerateRequest generate;
  std::string model;  // as asked; empty = the served model
  bool chat = false;
  bool stream = false;
  bool include_usage = false;
  bool logprobs = false;  // the response carries a logprobs object
};

// Parses and checks the body; the field-level checks the router does itself (ranges) are left
// to it, its INVALID_ARGUMENT message is passed through.
std::optional<ApiError> ParseCompletionRequest(std::string_view body, CompletionRequest* out);

// What rendering chat messages into a prompt needs: the served model's chat template (null when
// it has none: `unavailable` says why and what to do) and its special-token strings.
struct ChatRenderer {
  const ChatTemplate* chat_template = nullptr;
  std::string unavailable;
  std::string bos_token;
  std::string eos_token;
};

// A POST /v1/chat/completions body: the messages (and tools, chat_template_kwargs) rendered
// through the chat template into a text prompt without added special tokens (the template
// writes them), plus the sampling fields of completions, with chat's spelling (logprobs is a
// boolean, top_logprobs the count; max_completion_tokens; max_tokens unset runs to the end of the
// context).
std::optional<ApiError> ParseChatRequest(std::string_view body, const ChatRenderer& chat,
                                         CompletionRequest* out);

// gRPC status -> HTTP error (INVALID_ARGUMENT 400 with param = the field the message starts
// with, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504, NOT_FOUND 404, else 500).
ApiError FromGrpcError(const grpc::Status& status);

// What a completion has produced so far (one chunk's worth when streaming, all of it otherwise).
struct CompletionPiece {
  std::string text;
  std::vector<int32_t> token_ids;
  std::vector<v1::TokenLogprobs> logprobs;
  std::string finish_reason;  // empty: not finished (null)
  void Append(const v1::GenerateResponse& r);
};

struct CompletionIdentity {
  std::string id;  // "cmpl-..." or "chatcmpl-..."
  int64_t created = 0;
  std::string model;
  bool chat = false;
};

// A non-streaming response body ("text_completion" or "chat.completion"), or, for completions,
// one streaming chunk's JSON (without the "data: " framing).
std::string CompletionJson(const CompletionIdentity& who, const CompletionPiece& piece,
                           bool logprobs, const v1::Usage* usage);
// One "chat.completion.chunk": delta {role} on the first, {content} after, {} with the finish.
std::string ChatChunkJson(const CompletionIdentity& who, const CompletionPiece& piece,
                          bool logprobs, bool first);
// The include_usage chunk: choices empty, usage set.
std::string UsageChunkJson(const CompletionIdentity& who, const v1::Usage& usage);

std::string ModelsJson(const v1::ListModelsResponse& models, int64_t created);

std::string NewCompletionId(bool chat = false);

}  // namespace tandem::http
