// The OpenAI gateway's request parsing and response shapes, without a server (the end-to-end
// behaviour is in tests/integration/openai_http_test.cc).
#include "server/http/openai_protocol.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <random>
#include <string>

namespace tandem::http {
namespace {

using nlohmann::json;

std::optional<ApiError> Parse(const std::string& body, CompletionRequest* out) {
  return ParseCompletionRequest(body, out);
}

TEST(OpenAiProtocolTest, MapsPromptsAndSampling) {
  CompletionRequest r;
  ASSERT_FALSE(Parse(R"({"model":"m","prompt":"Hello","max_tokens":16.0,"temperature":0,
      "top_p":0.9,"top_k":5,"seed":7,"stop":"\n","stream":true,
      "stream_options":{"include_usage":true},"logprobs":2})", &r));
  EXPECT_EQ(r.model, "m");
  EXPECT_EQ(r.generate.model(), "m");
  EXPECT_EQ(r.generate.text(), "Hello");
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
  EXPECT_TRUE(r.logprobs);
  const v1::SamplingParams& s = r.generate.sampling();
  EXPECT_EQ(s.max_tokens(), 16);
  EXPECT_FLOAT_EQ(s.top_p(), 0.9f);
  EXPECT_EQ(s.top_k(), 5);
  EXPECT_EQ(s.seed(), 7u);
  ASSERT_EQ(s.stop_size(), 1);
  EXPECT_EQ(s.stop(0), "\n");

  CompletionRequest ids;
  ASSERT_FALSE(Parse(R"({"prompt":[1,2,3],"stop":["a","b"]})", &ids));
  EXPECT_EQ(ids.generate.token_ids().ids_size(), 3);
  EXPECT_EQ(ids.generate.sampling().stop_size(), 2);
  EXPECT_FALSE(ids.stream);
  // One prompt spelled as a one-element batch is that prompt.
  CompletionRequest one;
  ASSERT_FALSE(Parse(R"({"prompt":[[4,5]]})", &one));
  EXPECT_EQ(one.generate.token_ids().ids_size(), 2);
}

TEST(OpenAiProtocolTest, RefusesWhatItCannotServeNamingTheField) {
  struct Case {
    const char* body;
    const char* param;
  };
  const Case cases[] = {
      {"{", ""},
      {"[1,2]", ""},
      {R"({"max_tokens":4})", "prompt"},
      {R"({"prompt":["a","b"]})", "prompt"},
      {R"({"prompt":[1,-2]})", "prompt"},
      {R"({"prompt":{"x":1}})", "prompt"},
      {R"({"prompt":"x","n":2})", "n"},
      {R"({"prompt":"x","best_of":3})", "best_of"},
      {R"({"prompt":"x","echo":true})", "echo"},
      {R"({"prompt":"x","suffix":"y"})", "suffix"},
      {R"({"prompt":"x","max_tokens":1.5})", "max_tokens"},
      {R"({"prompt":"x","temperature":"hot"})", "temperature"},
      {R"({"prompt":"x","stop":[1]})", "stop"},
      {R"({"prompt":"x","stream":"yes"})", "stream"},
      {R"({"prompt":"x","model":3})", "model"},
  };
  for (const Case& c : cases) {
    CompletionRequest r;
    const std::optional<ApiError> e = Parse(c.body, &r);
    ASSERT_TRUE(e.has_value()) << c.body;
    EXPECT_EQ(e->status, 400) << c.body;
    EXPECT_EQ(e->param, c.param) << c.body;
    const json j = json::parse(ErrorJson(*e));
    EXPECT_EQ(j["error"]["type"], "invalid_request_error") << c.body;
    EXPECT_FALSE(j["error"]["message"].get<std::string>().empty()) << c.body;
  }
}

TEST(OpenAiProtocolTest, GrpcStatusesBecomeHttpErrors) {
  const ApiError bad = FromGrpcError(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                                  "max_tokens: must be at least 1"));
  EXPECT_EQ(bad.status, 400);
  EXPECT_EQ(bad.param, "max_tokens");
  EXPECT_EQ(FromGrpcError(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                       "prompt.text: invalid UTF-8 at byte 3"))
                .param,
            "prompt");
  EXPECT_EQ(FromGrpcError(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "full")).status, 429);
  EXPECT_EQ(FromGrpcError(grpc::Status(grpc::StatusCode::UNAVAILABLE, "down")).status, 503);
  EXPECT_EQ(FromGrpcError(grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "late")).status, 504);
  EXPECT_EQ(FromGrpcError(grpc::Status(grpc::StatusCode::NOT_FOUND, "model")).status, 404);
  EXPECT_EQ(FromGrpcError(grpc::Status(grpc::StatusCode::INTERNAL, "")).status, 500);
}

TEST(OpenAiProtocolTest, CompletionShapes) {
  CompletionPiece piece;
  v1::GenerateResponse a;
  a.add_token_ids(10);
  a.set_text("Hel");
  v1::GenerateResponse b;
  b.add_token_ids(11);
  b.set_text("lo");
  b.set_finish_reason("length");
  piece.Append(a);
  piece.Append(b);
  const CompletionIdentity who{NewCompletionId(), 1700000000, "demo"};
  v1::Usage usage;
  usage.set_prompt_tokens(3);
  usage.set_completion_tokens(2);
  const json j = json::parse(CompletionJson(who, piece, false, &usage));
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["model"], "demo");
  EXPECT_EQ(j["id"].get<std::string>().rfind("cmpl-", 0), 0u);
  EXPECT_EQ(j["choices"][0]["text"], "Hello");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["usage"]["total_tokens"], 5);
  const json u = json::parse(UsageChunkJson(who, usage));
  EXPECT_TRUE(u["choices"].empty());
  EXPECT_EQ(u["usage"]["completion_tokens"], 2);
  EXPECT_NE(NewCompletionId(), NewCompletionId());
}

// Mutated bodies: every one parses or is refused with a 400, never anything else.
TEST(OpenAiProtocolTest, MutatedBodiesNeverCrash) {
  const std::string seed =
      R"({"model":"m","prompt":[1,2,3],"max_tokens":8,"temperature":0.5,"stop":["x"],)"
      R"("stream":true,"stream_options":{"include_usage":true},"logprobs":1,"n":1})";
  std::mt19937 rng(11);
  for (int i = 0; i < 3000; ++i) {
    std::string body = seed;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < edits && !body.empty(); ++k) {
      const size_t at = rng() % body.size();
      switch (rng() % 3) {
        case 0:
          body[at] = static_cast<char>(rng() % 256);
          break;
        case 1:
          body.erase(at, 1 + rng() % 4);
          break;
        default:
          body.insert(at, 1, "{}[]\",:0-9e."[rng() % 12]);
      }
    }
    CompletionRequest r;
    const std::optional<ApiError> e = Parse(body, &r);
    if (e) {
      EXPECT_EQ(e->status, 400) << body;
    }
  }
}

}  // namespace
}  // namespace tandem::http
