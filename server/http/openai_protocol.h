// OpenAI wire shapes <-> tandem.v1 messages, and the one place where gRPC statuses become HTTP
// errors for the gateway. No I/O here: openai_gateway.cc does the HTTP and the calls.
#pragma once

#include <grpcpp/support/status.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

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

// A parsed POST /v1/completions body.
struct CompletionRequest {
  v1::GenerateRequest generate;
  std::string model;  // as asked; empty = the served model
  bool stream = false;
  bool include_usage = false;
  bool logprobs = false;  // the response carries a logprobs object
};

// Parses and checks the body; the field-level checks the router does itself (ranges) are left
// to it, its INVALID_ARGUMENT message is passed through.
std::optional<ApiError> ParseCompletionRequest(std::string_view body, CompletionRequest* out);

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
  std::string id;  // "cmpl-..."
  int64_t created = 0;
  std::string model;
};

// A non-streaming response body, or one streaming chunk's JSON (without the "data: " framing).
std::string CompletionJson(const CompletionIdentity& who, const CompletionPiece& piece,
                           bool logprobs, const v1::Usage* usage);
// The include_usage chunk: choices empty, usage set.
std::string UsageChunkJson(const CompletionIdentity& who, const v1::Usage& usage);

std::string ModelsJson(const v1::ListModelsResponse& models, int64_t created);

std::string NewCompletionId();

}  // namespace tandem::http
