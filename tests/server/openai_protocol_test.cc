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

// A chat template exercising what ParseChatRequest hands it: roles, content, tools in the
// client's key order, extra keywords and the special tokens.
ChatTemplate TestTemplate() {
  absl::StatusOr<ChatTemplate> t = ChatTemplate::Parse(
      "{{ bos_token }}{% if tools %}[tools={{ tools | tojson }}]{% endif %}"
      "{% if shout is defined and shout %}!{% endif %}"
      "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}"
      "{% endif %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
      "{% if add_generation_prompt %}<assistant>{% endif %}");
  EXPECT_TRUE(t.ok()) << t.status();
  return *std::move(t);
}

TEST(OpenAiProtocolTest, ChatRendersTheTemplateAndMapsChatFields) {
  const ChatTemplate tmpl = TestTemplate();
  ChatRenderer chat;
  chat.chat_template = &tmpl;
  chat.bos_token = "<s>";
  chat.eos_token = "</s>";
  CompletionRequest r;
  ASSERT_FALSE(ParseChatRequest(
      R"({"model":"m","messages":[{"role":"system","content":"S"},)"
      R"({"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],)"
      R"("tools":[{"type":"function","function":{"name":"f","parameters":{}}}],)"
      R"("chat_template_kwargs":{"shout":true},"max_completion_tokens":7,"max_tokens":99,)"
      R"("logprobs":true,"top_logprobs":3,"temperature":0.5,"seed":4,"stream":true})",
      chat, &r));
  EXPECT_TRUE(r.chat);
  EXPECT_EQ(r.model, "m");
  EXPECT_EQ(r.generate.text(),
            "<s>[tools=[{\"type\": \"function\", \"function\": {\"name\": \"f\", "
            "\"parameters\": {}}}]]!<system>S</s><user>a\nb</s><assistant>");
  EXPECT_FALSE(r.generate.add_special_tokens());  // the template wrote the BOS
  EXPECT_EQ(r.generate.sampling().max_tokens(), 7);  // max_completion_tokens wins
  EXPECT_FALSE(r.generate.max_tokens_to_context());
  EXPECT_EQ(r.generate.sampling().logprobs(), 3);
  EXPECT_TRUE(r.logprobs);
  EXPECT_EQ(r.generate.sampling().seed(), 4u);
  EXPECT_TRUE(r.stream);

  CompletionRequest plain;
  ASSERT_FALSE(ParseChatRequest(
      R"({"messages":[{"role":"user","content":"hi"}],"add_generation_prompt":false})", chat,
      &plain));
  EXPECT_EQ(plain.generate.text(), "<s><user>hi</s>");
  EXPECT_FALSE(plain.generate.sampling().has_max_tokens());
  EXPECT_TRUE(plain.generate.max_tokens_to_context());  // chat's default: up to the context
  EXPECT_FALSE(plain.logprobs);
  EXPECT_FALSE(plain.generate.sampling().has_logprobs());
}

TEST(OpenAiProtocolTest, ChatRefusalsNameTheField) {
  const ChatTemplate tmpl = TestTemplate();
  ChatRenderer chat;
  chat.chat_template = &tmpl;
  struct Case {
    std::string body;
    std::string param;
  };
  const std::vector<Case> cases = {
      {R"({"messages":[]})", "messages"},
      {R"({"prompt":"x"})", "messages"},
      {R"({"messages":"hi"})", "messages"},
      {R"({"messages":[3]})", "messages[0]"},
      {R"({"messages":[{"content":"x"}]})", "messages[0].role"},
      {R"({"messages":[{"role":"user","content":5}]})", "messages[0].content"},
      {R"({"messages":[{"role":"user","content":[{"type":"image_url"}]}]})",
       "messages[0].content"},
      {R"({"messages":[{"role":"tool","content":"x"}]})", "messages"},  // raise_exception
      {R"({"messages":[{"role":"user","content":"x"}],"n":2})", "n"},
      {R"({"messages":[{"role":"user","content":"x"}],"tool_choice":"required"})", "tool_choice"},
      {R"({"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}})",
       "response_format"},
      {R"({"messages":[{"role":"user","content":"x"}],"top_logprobs":2})", "top_logprobs"},
      {R"({"messages":[{"role":"user","content":"x"}],"logprobs":1})", "logprobs"},
      {R"({"messages":[{"role":"user","content":"x"}],"tools":{}})", "tools"},
      {R"({"messages":[{"role":"user","content":"x"}],"chat_template_kwargs":[]})",
       "chat_template_kwargs"},
      {R"({"messages":[{"role":"user","content":"x"}],"continue_final_message":true})",
       "continue_final_message"},
  };
  for (const Case& c : cases) {
    CompletionRequest r;
    const std::optional<ApiError> e = ParseChatRequest(c.body, chat, &r);
    ASSERT_TRUE(e.has_value()) << c.body;
    EXPECT_EQ(e->status, 400) << c.body;
    EXPECT_EQ(e->param, c.param) << c.body << ": " << e->message;
  }
  // No template: the message says what to do.
  ChatRenderer none;
  none.unavailable = "no template; start the server with --chat-template FILE";
  CompletionRequest r;
  const std::optional<ApiError> e =
      ParseChatRequest(R"({"messages":[{"role":"user","content":"x"}]})", none, &r);
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->status, 400);
  EXPECT_NE(e->message.find("--chat-template"), std::string::npos);
}

TEST(OpenAiProtocolTest, ChatShapes) {
  CompletionIdentity who{NewCompletionId(true), 1700000000, "m", true};
  EXPECT_EQ(who.id.rfind("chatcmpl-", 0), 0u);
  CompletionPiece piece;
  v1::GenerateResponse r;
  r.set_text("Hi");
  r.add_token_ids(5);
  v1::TokenLogprobs* lp = r.add_logprobs();
  lp->set_logprob(-0.5f);
  v1::TopLogprob* top = lp->add_top();
  top->set_token_id(5);
  top->set_logprob(-0.5f);
  r.set_finish_reason("stop");
  piece.Append(r);
  v1::Usage usage;
  usage.set_prompt_tokens(3);
  usage.set_completion_tokens(1);
  const json whole = json::parse(CompletionJson(who, piece, true, &usage));
  EXPECT_EQ(whole["object"], "chat.completion");
  EXPECT_EQ(whole["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(whole["choices"][0]["message"]["content"], "Hi");
  EXPECT_EQ(whole["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(whole["choices"][0]["logprobs"]["content"][0]["token"], "5");
  EXPECT_FLOAT_EQ(whole["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]["logprob"]
                      .get<float>(),
                  -0.5f);
  EXPECT_EQ(whole["usage"]["total_tokens"], 4);
  const json first = json::parse(ChatChunkJson(who, CompletionPiece{}, false, true));
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(first["choices"][0]["delta"]["content"], "");
  EXPECT_TRUE(first["choices"][0]["logprobs"].is_null());
  const json last = json::parse(ChatChunkJson(who, piece, false, false));
  EXPECT_FALSE(last["choices"][0]["delta"].contains("role"));
  EXPECT_EQ(last["choices"][0]["delta"]["content"], "Hi");
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(json::parse(UsageChunkJson(who, usage))["object"], "chat.completion.chunk");
}

// Mutated chat bodies: rendered or refused with a 400, never anything else.
TEST(OpenAiProtocolTest, MutatedChatBodiesNeverCrash) {
  const ChatTemplate tmpl = TestTemplate();
  ChatRenderer chat;
  chat.chat_template = &tmpl;
  const std::string seed =
      R"({"messages":[{"role":"system","content":"S"},{"role":"user","content":[{"type":"text",)"
      R"("text":"a"}]}],"tools":[{"type":"function"}],"chat_template_kwargs":{"shout":true},)"
      R"("max_tokens":8,"logprobs":true,"top_logprobs":1,"stream":true})";
  std::mt19937 rng(12);
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
    const std::optional<ApiError> e = ParseChatRequest(body, chat, &r);
    if (e) {
      EXPECT_EQ(e->status, 400) << body;
    }
  }
}

}  // namespace
}  // namespace tandem::http
