// The OpenAI-compatible HTTP gateway end to end: a real `tandem serve --http-port 0` process,
// driven over loopback HTTP/1.1 by a small socket client, compared against the gRPC API.
#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tandem/internal/v1/worker.grpc.pb.h"
#include "tandem/v1/tandem.grpc.pb.h"
#include "tests/integration/process.h"
#include "tests/integration/worker_probe.h"

namespace tandem {
namespace {

using nlohmann::json;
using testing_util::AllBlocksFree;
using testing_util::ScrapeMetrics;
using testing_util::TandemProcess;
namespace iv1 = internal::v1;

// The demo model: it has a tokenizer, so text prompts work.
const std::string kModel = TANDEM_DEMO_MODEL_DIR;

// A blocking loopback socket with a receive timeout, closed on destruction.
class Socket {
 public:
  explicit Socket(const std::string& addr) {
    const size_t colon = addr.rfind(':');
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(static_cast<uint16_t>(std::stoi(addr.substr(colon + 1))));
    inet_pton(AF_INET, addr.substr(0, colon).c_str(), &sa.sin_addr);
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    timeval tv{60, 0};
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (connect(fd_, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
      close(fd_);
      fd_ = -1;
    }
  }
  ~Socket() { Close(); }
  void Close() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }
  bool ok() const { return fd_ >= 0; }
  bool Send(const std::string& data) {
    size_t off = 0;
    while (off < data.size()) {
      const ssize_t n = send(fd_, data.data() + off, data.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return false;
      off += static_cast<size_t>(n);
    }
    return true;
  }
  // Appends what arrives to `buf`; false on EOF, error or timeout.
  bool Receive(std::string* buf) {
    char c[8192];
    const ssize_t n = recv(fd_, c, sizeof(c), 0);
    if (n <= 0) return false;
    buf->append(c, static_cast<size_t>(n));
    return true;
  }

 private:
  int fd_ = -1;
};

struct HttpResponse {
  int status = 0;
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;                            // de-chunked
  bool complete = false;
};

// Reads one response (Content-Length, chunked, or until the server closes).
HttpResponse ReadResponse(Socket& s, std::string& buf) {
  HttpResponse r;
  size_t end;
  while ((end = buf.find("\r\n\r\n")) == std::string::npos) {
    if (!s.Receive(&buf)) return r;
  }
  std::istringstream head(buf.substr(0, end));
  std::string line;
  std::getline(head, line);
  r.status = std::stoi(line.substr(9, 3));
  while (std::getline(head, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string name = line.substr(0, colon);
    for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    r.headers[name] = line.substr(line.find_first_not_of(' ', colon + 1));
  }
  buf.erase(0, end + 4);
  if (r.headers.count("content-length")) {
    const size_t len = std::stoul(r.headers["content-length"]);
    while (buf.size() < len) {
      if (!s.Receive(&buf)) return r;
    }
    r.body = buf.substr(0, len);
    buf.erase(0, len);
    r.complete = true;
  } else if (r.headers["transfer-encoding"] == "chunked") {
    for (;;) {
      size_t eol;
      while ((eol = buf.find("\r\n")) == std::string::npos) {
        if (!s.Receive(&buf)) return r;
      }
      const size_t len = std::stoul(buf.substr(0, eol), nullptr, 16);
      while (buf.size() < eol + 2 + len + 2) {
        if (!s.Receive(&buf)) return r;
      }
      r.body += buf.substr(eol + 2, len);
      buf.erase(0, eol + 2 + len + 2);
      if (len == 0) break;
    }
    r.complete = true;
  } else {
    while (s.Receive(&buf)) {
    }
    r.body = buf;
    r.complete = true;
  }
  return r;
}

std::string Request(const std::string& method, const std::string& path, const std::string& body,
                    bool close = true) {
  std::string r = method + " " + path + " HTTP/1.1\r\nHost: test\r\n";
  if (!body.empty() || method == "POST") {
    r +=
        "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
  }
  if (close) r += "Connection: close\r\n";
  return r + "\r\n" + body;
}

HttpResponse Exchange(const std::string& addr, const std::string& raw) {
  Socket s(addr);
  if (!s.ok() || !s.Send(raw)) return {};
  std::string buf;
  return ReadResponse(s, buf);
}

HttpResponse Post(const std::string& addr, const std::string& path, const json& body) {
  return Exchange(addr, Request("POST", path, body.dump()));
}

// The `data:` payloads of an SSE body, in order.
std::vector<std::string> Events(const std::string& body) {
  std::vector<std::string> out;
  size_t pos = 0, end;
  while ((end = body.find("\n\n", pos)) != std::string::npos) {
    const std::string ev = body.substr(pos, end - pos);
    if (ev.rfind("data: ", 0) == 0) out.push_back(ev.substr(6));
    pos = end + 2;
  }
  return out;
}

std::string ErrorParam(const HttpResponse& r) {
  const json j = json::parse(r.body, nullptr, false);
  if (j.is_discarded() || !j.contains("error")) return "<no error object>";
  return j["error"]["param"].is_null() ? "" : j["error"]["param"].get<std::string>();
}

struct GrpcResult {
  grpc::Status status;
  std::string text;
  int tokens = 0;
  v1::Usage usage;
};

GrpcResult GenerateOverGrpc(const std::string& addr, const v1::GenerateRequest& req) {
  auto stub = v1::Tandem::NewStub(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse resp;
  GrpcResult r;
  while (reader->Read(&resp)) {
    r.text += resp.text();
    r.tokens += resp.token_ids_size();
    if (resp.has_usage()) r.usage = resp.usage();
  }
  r.status = reader->Finish();
  return r;
}

class OpenAiHttpTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const auto dir =
        std::filesystem::temp_directory_path() / ("tandem-openai-" + std::to_string(getpid()));
    std::filesystem::create_directories(dir);
    server_ = new TandemProcess(
        {"serve", "--model", kModel, "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
         "--threads", "1", "--num-kv-blocks", "256", "--drain-grace-s", "5"},
        (dir / "serve.log").string());
    ready_ = server_->WaitReady();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    ASSERT_TRUE(ready_) << "tandem serve did not start; see " << server_->log_path();
    ASSERT_FALSE(http().empty()) << "no http= on the ready line";
  }
  static std::string http() { return server_->field("http"); }
  static std::string grpc() { return server_->field("grpc"); }

  static TandemProcess* server_;
  static bool ready_;
};

TandemProcess* OpenAiHttpTest::server_ = nullptr;
bool OpenAiHttpTest::ready_ = false;

const char* kPrompt = "The quick brown fox";

v1::GenerateRequest GreedyText(int max_tokens) {
  v1::GenerateRequest r;
  r.set_text(kPrompt);
  r.set_add_special_tokens(true);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  r.mutable_sampling()->set_temperature(0);
  r.mutable_sampling()->set_ignore_eos(true);
  return r;
}

TEST_F(OpenAiHttpTest, GreedyCompletionEqualsTheGrpcPath) {
  const GrpcResult want = GenerateOverGrpc(grpc(), GreedyText(12));
  ASSERT_TRUE(want.status.ok()) << want.status.error_message();
  const HttpResponse r = Post(http(), "/v1/completions",
                              {{"model", "demo-model"},
                               {"prompt", kPrompt},
                               {"max_tokens", 12},
                               {"temperature", 0},
                               {"ignore_eos", true}});
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.headers.at("content-type"), "application/json");
  const json j = json::parse(r.body);
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["model"], "demo-model");
  EXPECT_EQ(j["id"].get<std::string>().rfind("cmpl-", 0), 0u);
  ASSERT_EQ(j["choices"].size(), 1u);
  EXPECT_EQ(j["choices"][0]["text"], want.text);
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(j["choices"][0]["logprobs"].is_null());
  EXPECT_EQ(j["usage"]["completion_tokens"], want.tokens);
  EXPECT_EQ(j["usage"]["completion_tokens"], 12);
  EXPECT_EQ(j["usage"]["prompt_tokens"], want.usage.prompt_tokens());
  EXPECT_EQ(j["usage"]["total_tokens"], want.usage.prompt_tokens() + 12);
}

TEST_F(OpenAiHttpTest, StreamedEventsConcatenateToTheSameText) {
  const GrpcResult want = GenerateOverGrpc(grpc(), GreedyText(10));
  ASSERT_TRUE(want.status.ok());
  const HttpResponse r = Post(http(), "/v1/completions",
                              {{"prompt", kPrompt},
                               {"max_tokens", 10},
                               {"temperature", 0},
                               {"ignore_eos", true},
                               {"stream", true},
                               {"stream_options", {{"include_usage", true}}}});
  ASSERT_EQ(r.status, 200) << r.body;
  ASSERT_TRUE(r.complete);
  EXPECT_EQ(r.headers.at("content-type"), "text/event-stream");
  EXPECT_EQ(r.headers.at("transfer-encoding"), "chunked");
  const std::vector<std::string> events = Events(r.body);
  ASSERT_GE(events.size(), 3u) << r.body;
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  std::string finish;
  int usage_chunks = 0;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const json j = json::parse(events[i]);
    EXPECT_EQ(j["object"], "text_completion");
    if (j["choices"].empty()) {
      ++usage_chunks;
      EXPECT_EQ(j["usage"]["completion_tokens"], 10);
      EXPECT_EQ(j["usage"]["prompt_tokens"], want.usage.prompt_tokens());
      continue;
    }
    EXPECT_TRUE(finish.empty()) << "a chunk after the finish_reason";
    text += j["choices"][0]["text"].get<std::string>();
    if (!j["choices"][0]["finish_reason"].is_null()) finish = j["choices"][0]["finish_reason"];
  }
  EXPECT_EQ(text, want.text);
  EXPECT_EQ(finish, "length");
  EXPECT_EQ(usage_chunks, 1);
}

TEST_F(OpenAiHttpTest, TokenIdPromptAndLogprobs) {
  v1::GenerateRequest g;
  for (int id : {5, 17, 42, 99}) g.mutable_token_ids()->add_ids(id);
  g.mutable_sampling()->set_max_tokens(6);
  g.mutable_sampling()->set_temperature(0);
  g.mutable_sampling()->set_ignore_eos(true);
  const GrpcResult want = GenerateOverGrpc(grpc(), g);
  ASSERT_TRUE(want.status.ok());
  const HttpResponse r = Post(http(), "/v1/completions",
                              {{"prompt", {5, 17, 42, 99}},
                               {"max_tokens", 6},
                               {"temperature", 0},
                               {"ignore_eos", true},
                               {"logprobs", 2}});
  ASSERT_EQ(r.status, 200) << r.body;
  const json j = json::parse(r.body);
  EXPECT_EQ(j["choices"][0]["text"], want.text);
  EXPECT_EQ(j["usage"]["prompt_tokens"], 4);
  const json& lp = j["choices"][0]["logprobs"];
  ASSERT_TRUE(lp.is_object()) << r.body;
  EXPECT_EQ(lp["tokens"].size(), 6u);
  ASSERT_EQ(lp["token_logprobs"].size(), 6u);
  ASSERT_EQ(lp["top_logprobs"].size(), 6u);
  EXPECT_LE(lp["token_logprobs"][0].get<double>(), 0.0);
  EXPECT_EQ(lp["top_logprobs"][0].size(), 2u);
}

TEST_F(OpenAiHttpTest, ErrorsUseOpenAiShapeAndStatus) {
  // Malformed JSON.
  HttpResponse r = Exchange(http(), Request("POST", "/v1/completions", "{\"prompt\": "));
  EXPECT_EQ(r.status, 400) << r.body;
  EXPECT_EQ(json::parse(r.body)["error"]["type"], "invalid_request_error");
  // n != 1 names the field.
  r = Post(http(), "/v1/completions", {{"prompt", "hi"}, {"n", 2}});
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(ErrorParam(r), "n");
  r = Post(http(), "/v1/completions", {{"prompt", "hi"}, {"echo", true}});
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(ErrorParam(r), "echo");
  r = Post(http(), "/v1/completions", {{"prompt", {"a", "b"}}});
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(ErrorParam(r), "prompt");
  // The router's INVALID_ARGUMENT passes through with its field.
  r = Post(http(), "/v1/completions", {{"prompt", "hi"}, {"top_p", 7}});
  EXPECT_EQ(r.status, 400) << r.body;
  EXPECT_EQ(ErrorParam(r), "top_p") << r.body;
  // Unknown model.
  r = Post(http(), "/v1/completions", {{"prompt", "hi"}, {"model", "gpt-nope"}});
  EXPECT_EQ(r.status, 404);
  EXPECT_EQ(json::parse(r.body)["error"]["code"], "model_not_found");
  // Wrong method, unknown path, chat.
  r = Exchange(http(), Request("GET", "/v1/completions", ""));
  EXPECT_EQ(r.status, 405);
  EXPECT_EQ(r.headers["allow"], "POST");
  r = Exchange(http(), Request("GET", "/v2/nothing", ""));
  EXPECT_EQ(r.status, 404);
  // Chat on a model folder without a chat template: 400 saying how to give one.
  r = Post(http(), "/v1/chat/completions",
           {{"model", "demo-model"}, {"messages", {{{"role", "user"}, {"content", "hi"}}}}});
  EXPECT_EQ(r.status, 400);
  EXPECT_NE(json::parse(r.body)["error"]["message"].get<std::string>().find("--chat-template"),
            std::string::npos)
      << r.body;
  // A body over the limit is refused from its Content-Length, before it is read.
  r = Exchange(http(),
               "POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 104857600\r\n\r\n");
  EXPECT_EQ(r.status, 413);
  EXPECT_EQ(r.headers["connection"], "close");
  // Headers over the limit.
  r = Exchange(http(), "GET /health HTTP/1.1\r\nX-Big: " + std::string(20000, 'x') + "\r\n\r\n");
  EXPECT_EQ(r.status, 431);
}

TEST_F(OpenAiHttpTest, ModelsHealthAndKeepAlive) {
  // Three requests on one keep-alive connection, the last two pipelined.
  Socket s(http());
  ASSERT_TRUE(s.ok());
  std::string buf;
  ASSERT_TRUE(s.Send(Request("GET", "/v1/models", "", false)));
  HttpResponse r = ReadResponse(s, buf);
  ASSERT_EQ(r.status, 200) << r.body;
  const json j = json::parse(r.body);
  EXPECT_EQ(j["object"], "list");
  ASSERT_EQ(j["data"].size(), 1u);
  EXPECT_EQ(j["data"][0]["id"], "demo-model");
  EXPECT_EQ(j["data"][0]["object"], "model");
  EXPECT_EQ(j["data"][0]["owned_by"], "tandem");
  EXPECT_GT(j["data"][0]["max_model_len"].get<int64_t>(), 0);
  ASSERT_TRUE(s.Send(Request("GET", "/health", "", false) + Request("GET", "/health", "")));
  r = ReadResponse(s, buf);
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.body, "ok\n");
  r = ReadResponse(s, buf);
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.headers["connection"], "close");
}

TEST_F(OpenAiHttpTest, ClientDisconnectMidStreamFreesTheKvCache) {
  {
    Socket s(http());
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE(s.Send(Request(
        "POST", "/v1/completions",
        json{{"prompt", kPrompt}, {"max_tokens", 400}, {"ignore_eos", true}, {"stream", true}}
            .dump())));
    std::string buf;
    while (buf.find("data: ") == std::string::npos) {
      ASSERT_TRUE(s.Receive(&buf)) << "no event before the connection ended";
    }
    // Gone mid-stream: the gateway must cancel the gRPC call.
  }
  std::string detail;
  EXPECT_TRUE(AllBlocksFree(server_->field("decode_grpc"), &detail)) << detail;
  // The router counted it as cancelled (not completed); its counter may trail the worker.
  const std::string cancelled =
      "tandem_requests_total{model=\"demo-model\",outcome=\"cancelled\"} 1";
  std::string metrics;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < deadline) {
    metrics = ScrapeMetrics(server_->field("metrics"));
    if (metrics.find(cancelled) != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_NE(metrics.find(cancelled), std::string::npos) << metrics.substr(0, 3000);
  // And the server still serves.
  const HttpResponse r =
      Post(http(), "/v1/completions", {{"prompt", kPrompt}, {"max_tokens", 4}, {"temperature", 0}});
  EXPECT_EQ(r.status, 200) << r.body;
}

// SIGTERM with a stream in flight: the gateway stops accepting, the stream finishes within the
// drain grace period, and the process exits cleanly (the gateway stops before the router).
// /v1/chat/completions with a chat template given on the command line (the demo model has none).
constexpr char kChatTemplate[] =
    "{%- if messages[0].role not in ['system', 'user'] %}"
    "{{ raise_exception('the first message must come from the system or the user') }}"
    "{% endif -%}\n"
    "{%- for m in messages %}<|{{ m.role }}|>\n{{ m.content | trim }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}\n";
// What jinja2 renders for kChatMessages with add_generation_prompt (checked with Python).
constexpr char kChatPrompt[] = "<|system|>\nBe brief.\n<|user|>\nThe quick brown fox\n<|assistant|>\n";

json ChatMessages() {
  return json::array({{{"role", "system"}, {"content", "Be brief. "}},
                      {{"role", "user"}, {"content", {{{"type", "text"}, {"text", kPrompt}}}}}});
}

class OpenAiChatTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const auto dir =
        std::filesystem::temp_directory_path() / ("tandem-chat-" + std::to_string(getpid()));
    std::filesystem::create_directories(dir);
    const std::string tmpl = (dir / "chat.jinja").string();
    FILE* f = std::fopen(tmpl.c_str(), "w");
    std::fputs(kChatTemplate, f);
    std::fclose(f);
    server_ = new TandemProcess(
        {"serve", "--model", kModel, "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
         "--threads", "1", "--num-kv-blocks", "256", "--drain-grace-s", "5", "--chat-template",
         tmpl},
        (dir / "serve.log").string());
    ready_ = server_->WaitReady();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    ASSERT_TRUE(ready_) << "tandem serve did not start; see " << server_->log_path();
  }
  static std::string http() { return server_->field("http"); }
  static std::string grpc() { return server_->field("grpc"); }

  static TandemProcess* server_;
  static bool ready_;
};

TandemProcess* OpenAiChatTest::server_ = nullptr;
bool OpenAiChatTest::ready_ = false;

// The rendered prompt goes to the router as text without added special tokens: the same tokens
// as a gRPC call with that text.
TEST_F(OpenAiChatTest, GreedyChatEqualsTheGrpcPathOnTheRenderedPrompt) {
  v1::GenerateRequest req = GreedyText(12);
  req.set_text(kChatPrompt);
  req.set_add_special_tokens(false);
  const GrpcResult want = GenerateOverGrpc(grpc(), req);
  ASSERT_TRUE(want.status.ok()) << want.status.error_message();
  const HttpResponse r = Post(http(), "/v1/chat/completions",
                              {{"messages", ChatMessages()},
                               {"max_completion_tokens", 12},
                               {"temperature", 0},
                               {"ignore_eos", true}});
  ASSERT_EQ(r.status, 200) << r.body;
  const json j = json::parse(r.body);
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["id"].get<std::string>().rfind("chatcmpl-", 0), 0u);
  EXPECT_EQ(j["model"], "demo-model");
  EXPECT_EQ(j["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(j["choices"][0]["message"]["content"], want.text);
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["usage"]["completion_tokens"], 12);
  EXPECT_EQ(j["usage"]["prompt_tokens"], want.usage.prompt_tokens());
}

TEST_F(OpenAiChatTest, StreamStartsWithTheRoleAndConcatenatesToTheSameAnswer) {
  const json body = {{"messages", ChatMessages()}, {"max_tokens", 10}, {"temperature", 0},
                     {"ignore_eos", true},         {"logprobs", true},  {"top_logprobs", 2}};
  const HttpResponse whole = Post(http(), "/v1/chat/completions", body);
  ASSERT_EQ(whole.status, 200) << whole.body;
  const json w = json::parse(whole.body);
  ASSERT_EQ(w["choices"][0]["logprobs"]["content"].size(), 10u);
  EXPECT_EQ(w["choices"][0]["logprobs"]["content"][0]["top_logprobs"].size(), 2u);

  json streamed = body;
  streamed["stream"] = true;
  streamed["stream_options"] = {{"include_usage", true}};
  const HttpResponse r = Post(http(), "/v1/chat/completions", streamed);
  ASSERT_EQ(r.status, 200) << r.body;
  const std::vector<std::string> events = Events(r.body);
  ASSERT_GE(events.size(), 3u) << r.body;
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  std::string finish;
  size_t logprob_entries = 0;
  int usage_chunks = 0;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const json j = json::parse(events[i]);
    EXPECT_EQ(j["object"], "chat.completion.chunk");
    if (j["choices"].empty()) {
      ++usage_chunks;
      EXPECT_EQ(j["usage"]["completion_tokens"], 10);
      continue;
    }
    const json& delta = j["choices"][0]["delta"];
    EXPECT_EQ(delta.contains("role"), i == 0) << events[i];
    if (delta.contains("content")) text += delta["content"].get<std::string>();
    if (j["choices"][0]["logprobs"].is_object()) {
      logprob_entries += j["choices"][0]["logprobs"]["content"].size();
    }
    if (!j["choices"][0]["finish_reason"].is_null()) finish = j["choices"][0]["finish_reason"];
  }
  EXPECT_EQ(text, w["choices"][0]["message"]["content"]);
  EXPECT_EQ(logprob_entries, 10u);
  EXPECT_EQ(finish, "length");
  EXPECT_EQ(usage_chunks, 1);
}

TEST_F(OpenAiChatTest, BadConversationsGet400NamingTheField) {
  // The template's own raise_exception.
  HttpResponse r = Post(http(), "/v1/chat/completions",
                        {{"messages", {{{"role", "assistant"}, {"content", "hi"}}}}});
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(ErrorParam(r), "messages");
  EXPECT_NE(r.body.find("must come from the system or the user"), std::string::npos) << r.body;
  r = Post(http(), "/v1/chat/completions", {{"messages", {{{"content", "no role"}}}}});
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(ErrorParam(r), "messages[0].role");
  r = Post(http(), "/v1/chat/completions",
           {{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"tool_choice", "required"}});
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(ErrorParam(r), "tool_choice");
  r = Post(http(), "/v1/chat/completions",
           {{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"top_logprobs", 3}});
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(ErrorParam(r), "top_logprobs");
  // A range the router checks: its message and field come through.
  r = Post(http(), "/v1/chat/completions",
           {{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"temperature", -1}});
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(ErrorParam(r), "temperature");
  // Nothing was left behind by any of them.
  v1::GenerateRequest ok = GreedyText(2);
  EXPECT_TRUE(GenerateOverGrpc(grpc(), ok).status.ok());
}

TEST(OpenAiHttpDrainTest, SigtermFinishesTheStreamInFlightThenExits) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("tandem-openai-drain-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  TandemProcess server(
      {"serve", "--model", kModel, "--grpc-port", "0", "--http-port", "0", "--metrics-port", "-1",
       "--threads", "1", "--num-kv-blocks", "256", "--drain-grace-s", "30"},
      (dir / "serve.log").string());
  ASSERT_TRUE(server.WaitReady()) << server.log_path();
  Socket s(server.field("http"));
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE(s.Send(
      Request("POST", "/v1/completions",
              json{{"prompt", kPrompt}, {"max_tokens", 200}, {"ignore_eos", true}, {"stream", true}}
                  .dump())));
  std::string buf;
  while (buf.find("data: ") == std::string::npos) {
    ASSERT_TRUE(s.Receive(&buf));
  }
  server.Signal(SIGTERM);
  while (s.Receive(&buf)) {
  }
  EXPECT_NE(buf.find("data: [DONE]"), std::string::npos)
      << buf.substr(buf.size() > 500 ? buf.size() - 500 : 0);
  EXPECT_EQ(server.Wait(std::chrono::seconds(30)), 0) << server.log_path();
}

}  // namespace
}  // namespace tandem
