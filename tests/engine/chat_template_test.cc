// Chat templates: byte-exact agreement with jinja2 (goldens from make_goldens.py), syntax errors
// with positions, unsupported constructs named, resource limits, hostile (mutated) templates, and
// reading the template out of tokenizer_config.json.
#include "engine/chat_template.h"

#include <gtest/gtest.h>

#include <chrono>
#include <ctime>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/engine/test_util.h"

namespace tandem {
namespace {

using nlohmann::json;
using nlohmann::ordered_json;

// The goldens keep Python's key order (tool schemas print through tojson), so they are read
// as ordered_json.
const ordered_json& Goldens() {
  static const ordered_json* goldens = [] {
    std::ifstream f(testing_util::TestData("chat_templates/golden.json"));
    std::stringstream ss;
    ss << f.rdbuf();
    return new ordered_json(ordered_json::parse(ss.str()));
  }();
  return *goldens;
}

std::string TemplateSource(const std::string& name) {
  return Goldens()["templates"][name].get<std::string>();
}

bool Contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

TEST(ChatTemplateGoldenTest, EveryCaseMatchesJinja2) {
  const auto& cases = Goldens()["cases"];
  ASSERT_GT(cases.size(), 150u);
  int rendered = 0;
  int failed_as_expected = 0;
  for (size_t k = 0; k < cases.size(); ++k) {
    const auto& c = cases[k];
    const std::string name = c["template"].get<std::string>();
    SCOPED_TRACE("case " + std::to_string(k) + " template " + name + " context " +
                 c["context"].dump().substr(0, 300));
    auto tmpl = ChatTemplate::Parse(TemplateSource(name));
    if (c.contains("error") && c["phase"] == "parse") {
      EXPECT_FALSE(tmpl.ok()) << "jinja2 refused to compile: " << c["error"];
      if (!tmpl.ok()) {
        EXPECT_EQ(tmpl.status().code(), absl::StatusCode::kInvalidArgument);
        EXPECT_TRUE(Contains(std::string(tmpl.status().message()), "line "))
            << tmpl.status().message();
        ++failed_as_expected;
      }
      continue;
    }
    ASSERT_TRUE(tmpl.ok()) << tmpl.status();
    auto out = tmpl->Render(c["context"]);
    if (c.contains("error")) {
      EXPECT_FALSE(out.ok()) << "jinja2 failed with " << c["error_type"] << ": " << c["error"]
                             << "\nwe rendered: " << (out.ok() ? *out : "");
      if (!out.ok()) {
        EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument) << out.status();
        if (c["error_type"] == "TemplateError") {  // raise_exception: the author's message
          EXPECT_EQ(std::string(out.status().message()), c["error"].get<std::string>());
        }
        ++failed_as_expected;
      }
      continue;
    }
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(*out, c["expected"].get<std::string>());
    ++rendered;
  }
  EXPECT_GT(rendered, 150);
  EXPECT_GT(failed_as_expected, 25);
}

// The nlohmann::json overload (sorted keys) renders the same wherever the context's keys were
// already in sorted order.
TEST(ChatTemplateGoldenTest, SortedJsonContextRendersTheSame) {
  int checked = 0;
  for (const auto& c : Goldens()["cases"]) {
    const std::string name = c["template"].get<std::string>();
    if (!c.contains("expected") || json::parse(c["context"].dump()).dump() != c["context"].dump()) {
      continue;
    }
    ++checked;
    auto tmpl = ChatTemplate::Parse(TemplateSource(name));
    ASSERT_TRUE(tmpl.ok()) << tmpl.status();
    auto out = tmpl->Render(json::parse(c["context"].dump()));
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(*out, c["expected"].get<std::string>());
  }
  EXPECT_GT(checked, 20);
}

absl::StatusOr<std::string> RenderText(const std::string& source,
                                       const json& context = json::object()) {
  auto tmpl = ChatTemplate::Parse(source);
  if (!tmpl.ok()) {
    return tmpl.status();
  }
  return tmpl->Render(context);
}

TEST(ChatTemplateSyntaxTest, ErrorsCarryLineAndColumn) {
  struct Case {
    std::string source;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {"line one\n{{ 1 + }}", "line 2, column 8: "},
      {"{% if x %}\n\n  {% endfor %}", "line 3, column 6: unexpected '{% endfor %}'"},
      {"ab\n  {{ x | nope }}", "line 2, column 10: unknown filter 'nope'"},
      {"{{ x is frob }}", "line 1, column 9: unknown test 'frob'"},
      {"{% for x in y %}\n{% if %}", "line 2, column 7: "},
      {"{{ 'open", "line 1, column 4: unterminated string literal"},
      {"{# never closed", "line 1, column 1: missing end of comment tag"},
      {"{% if x %}", "unexpected end of template"},
      {"{{ (1, 2 }}", "line 1, column 10: unexpected '}', expected ')'"},
      {"{% frob %}", "line 1, column 4: unknown tag 'frob'"},
      {"{% break %}", "line 1, column 4: 'break' outside loop"},
      {"héllo {{ @ }}", "line 1, column 10: unexpected char '@'"},
  };
  for (const auto& c : cases) {
    auto tmpl = ChatTemplate::Parse(c.source);
    ASSERT_FALSE(tmpl.ok()) << c.source;
    EXPECT_EQ(tmpl.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(Contains(std::string(tmpl.status().message()), c.expected))
        << c.source << " -> " << tmpl.status().message();
  }
}

TEST(ChatTemplateSyntaxTest, UnsupportedConstructsAreNamed) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{% include 'x.jinja' %}", "unsupported construct: '{% include %}'"},
      {"{% extends 'base' %}", "unsupported construct: '{% extends %}'"},
      {"{% import 'm' as m %}", "unsupported construct: '{% import %}'"},
      {"{% call m() %}x{% endcall %}", "unsupported construct: '{% call %}'"},
      {"{% block b %}{% endblock %}", "unsupported construct: '{% block %}'"},
      {"{% do x.append(1) %}", "unsupported construct: '{% do %}'"},
      {"{% for x in y recursive %}{% endfor %}", "unsupported construct: recursive for loops"},
      {"{{ f(*args) }}", "unsupported construct: *args/**kwargs"},
      {"{{ x | groupby('a') }}", "unsupported filter 'groupby'"},
      {"{{ x | format(1) }}", "unsupported filter 'format'"},
      {"{{ x is escaped }}", "unsupported test 'escaped'"},
  };
  for (const auto& [source, expected] : cases) {
    auto tmpl = ChatTemplate::Parse(source);
    ASSERT_FALSE(tmpl.ok()) << source;
    EXPECT_EQ(tmpl.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(Contains(std::string(tmpl.status().message()), expected))
        << source << " -> " << tmpl.status().message();
  }
  // Runtime-only ones.
  auto out = RenderText("{{ '%s' % 1 }}");
  ASSERT_FALSE(out.ok());
  EXPECT_TRUE(Contains(std::string(out.status().message()), "unsupported construct"));
  out = RenderText("{{ cycler(1, 2) }}");
  ASSERT_FALSE(out.ok());
  EXPECT_TRUE(Contains(std::string(out.status().message()), "'cycler'"));
}

TEST(ChatTemplateRenderTest, RuntimeErrorsNameTheProblem) {
  auto out = RenderText("{{ 'a' + [1] }}");
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(std::string(out.status().message()), "can only concatenate str"))
      << out.status();
  EXPECT_TRUE(Contains(std::string(out.status().message()), "list")) << out.status();
  out = RenderText("\n  {{ messages[0].role.x() }}", {{"messages", json::array()}});
  ASSERT_FALSE(out.ok());
  EXPECT_TRUE(Contains(std::string(out.status().message()), "line 2")) << out.status();
  // raise_exception's message is passed through untouched.
  out = RenderText("{{ raise_exception('Roles must alternate') }}");
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().message(), "Roles must alternate");
}

TEST(ChatTemplateRenderTest, ContextMustBeAnObject) {
  auto tmpl = ChatTemplate::Parse("x");
  ASSERT_TRUE(tmpl.ok());
  EXPECT_EQ(tmpl->Render(json::array()).status().code(), absl::StatusCode::kInvalidArgument);
  json deep = json::array();
  for (int k = 0; k < 1000; ++k) {
    deep = json::array({std::move(deep)});
  }
  EXPECT_EQ(tmpl->Render(json{{"deep", deep}}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ChatTemplateRenderTest, StrftimeNowUsesTheLocalClock) {
  std::time_t now = std::time(nullptr);
  std::tm local{};
  localtime_r(&now, &local);
  char year[16];
  std::strftime(year, sizeof(year), "%Y", &local);
  auto out = RenderText("{{ strftime_now('%Y') }}");
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, year);  // (flaky only across a New Year's midnight)
}

TEST(ChatTemplateRenderTest, GenerationBlocksRenderTheirBody) {
  auto out = RenderText("{% generation %}kept {{ 1 }}{% endgeneration %}");
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, "kept 1");
}

TEST(ChatTemplateRenderTest, MovedTemplateStillRendersAndIsThreadSafeToShare) {
  auto tmpl = ChatTemplate::Parse("{% for m in messages %}{{ m.content }}{% endfor %}");
  ASSERT_TRUE(tmpl.ok());
  ChatTemplate moved = *std::move(tmpl);
  json ctx = {{"messages", json::array({{{"content", "a"}}, {{"content", "b"}}})}};
  auto out = moved.Render(ctx);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out, "ab");
}

TEST(ChatTemplateRenderTest, SharedTemplateRendersConcurrently) {
  const ordered_json* golden = nullptr;
  for (const auto& c : Goldens()["cases"]) {
    if (c["template"] == "qwen3" && c.contains("expected") && c["context"].contains("tools")) {
      golden = &c;
      break;
    }
  }
  ASSERT_NE(golden, nullptr);
  auto tmpl = ChatTemplate::Parse(TemplateSource("qwen3"));
  ASSERT_TRUE(tmpl.ok());
  const std::string expected = (*golden)["expected"].get<std::string>();
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < mismatches.size(); ++t) {
    threads.emplace_back([&, t] {
      for (int k = 0; k < 50; ++k) {
        auto out = tmpl->Render((*golden)["context"]);
        if (!out.ok() || *out != expected) {
          ++mismatches[t];
        }
      }
    });
  }
  for (auto& th : threads) {
    th.join();
  }
  EXPECT_EQ(mismatches, std::vector<int>(4, 0));
}

// A long real conversation stays well inside the step budget.
TEST(ChatTemplateLimitsTest, LongConversationRendersWithinBudget) {
  auto tmpl = ChatTemplate::Parse(TemplateSource("qwen3"));
  ASSERT_TRUE(tmpl.ok());
  ordered_json messages = ordered_json::array();
  messages.push_back({{"role", "system"}, {"content", "You are a helpful assistant."}});
  const std::string body(2000, 'w');
  for (int k = 0; k < 2000; ++k) {
    messages.push_back({{"role", k % 2 == 0 ? "user" : "assistant"},
                        {"content", (k % 2 == 0 ? "" : "<think>\nhmm\n</think>\n\n") + body}});
  }
  ordered_json ctx = {{"messages", messages}, {"add_generation_prompt", true}};
  auto start = std::chrono::steady_clock::now();
  auto out = tmpl->Render(ctx);
  auto elapsed = std::chrono::steady_clock::now() - start;
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_GT(out->size(), 4000000u);
  EXPECT_LT(elapsed, std::chrono::seconds(10));
}

// ---- resource limits: each must stop quickly with RESOURCE_EXHAUSTED.

void ExpectExhausted(const std::string& source) {
  auto start = std::chrono::steady_clock::now();
  auto out = RenderText(source);
  auto elapsed = std::chrono::steady_clock::now() - start;
  ASSERT_FALSE(out.ok()) << source;
  EXPECT_EQ(out.status().code(), absl::StatusCode::kResourceExhausted)
      << source << " -> " << out.status();
  // About a second in a release build; generous for sanitizers and loaded CI machines.
  EXPECT_LT(elapsed, std::chrono::seconds(30)) << source;
}

TEST(ChatTemplateLimitsTest, HostileTemplatesAreBounded) {
  ExpectExhausted("{% for i in range(100000000) %}{% endfor %}");
  ExpectExhausted(
      "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}");
  ExpectExhausted("{{ 'x' * 100000000 }}");
  ExpectExhausted("{{ [1] * 100000000 }}");
  ExpectExhausted(
      "{% set ns = namespace(s='xxxxxxxxxxxxxxxx') %}{% for i in range(64) %}"
      "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}");
  ExpectExhausted("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}");
  ExpectExhausted(
      "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}"
      "{% endfor %}");
  ExpectExhausted(
      "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = [ns.l] %}"
      "{% endfor %}");
  ExpectExhausted("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
  ExpectExhausted("{% set ns = namespace(x='" + std::string(1 << 20, 'a') +
                  "') %}{% set l = [ns.x] * 40 %}{{ l | tojson }}");
  ExpectExhausted(
      "{% macro f(n) %}{% for i in range(10) %}{{ f(n - 1) if n > 0 }}{% endfor %}"
      "{% endmacro %}{{ f(20) }}");
}

TEST(ChatTemplateLimitsTest, DeepNestingIsRefusedAtParse) {
  std::string deep_parens =
      "{{ " + std::string(100000, '(') + "1" + std::string(100000, ')') + " }}";
  EXPECT_EQ(ChatTemplate::Parse(deep_parens).status().code(), absl::StatusCode::kInvalidArgument);
  std::string long_sum = "{{ 1";
  for (int k = 0; k < 100000; ++k) {
    long_sum += " + 1";
  }
  long_sum += " }}";
  EXPECT_EQ(ChatTemplate::Parse(long_sum).status().code(), absl::StatusCode::kInvalidArgument);
  std::string deep_ifs;
  for (int k = 0; k < 10000; ++k) {
    deep_ifs += "{% if true %}";
  }
  EXPECT_EQ(ChatTemplate::Parse(deep_ifs).status().code(), absl::StatusCode::kInvalidArgument);
  std::string filters = "{{ x";
  for (int k = 0; k < 100000; ++k) {
    filters += "|trim";
  }
  filters += " }}";
  EXPECT_EQ(ChatTemplate::Parse(filters).status().code(), absl::StatusCode::kInvalidArgument);
}

// Random byte-level and token-level mutations of the golden templates: parse and render must
// always come back with a status or a string (no crash, no hang, no sanitizer report).
TEST(ChatTemplateFuzzTest, MutatedTemplatesNeverCrash) {
  std::vector<std::string> sources;
  for (const auto& [name, source] : Goldens()["templates"].items()) {
    sources.push_back(source.get<std::string>());
  }
  std::vector<ordered_json> contexts;
  for (const auto& c : Goldens()["cases"]) {
    if (c["context"].contains("messages") && contexts.size() < 40) {
      contexts.push_back(c["context"]);
    }
  }
  ASSERT_FALSE(contexts.empty());
  static const char* kFragments[] = {"{{",
                                     "}}",
                                     "{%",
                                     "%}",
                                     "{#",
                                     "#}",
                                     "-",
                                     "+",
                                     "|",
                                     "(",
                                     ")",
                                     "[",
                                     "]",
                                     "{",
                                     "}",
                                     "'",
                                     "\"",
                                     ".",
                                     ",",
                                     ":",
                                     "~",
                                     "*",
                                     "**",
                                     "//",
                                     "%",
                                     " if ",
                                     " else ",
                                     " in ",
                                     " not ",
                                     " is ",
                                     " and ",
                                     " or ",
                                     "loop.index",
                                     "messages",
                                     "ns",
                                     "range(99999)",
                                     "[::-1]",
                                     "| tojson",
                                     "| join",
                                     "| length",
                                     "{% endfor %}",
                                     "{% endif %}",
                                     "{% else %}",
                                     "{% break %}",
                                     "{% set x = 1 %}",
                                     "{% for m in messages %}",
                                     "{% if m %}",
                                     "raise_exception('x')",
                                     "\xff",
                                     "\xc3",
                                     "\n",
                                     " ",
                                     "0",
                                     "-1",
                                     "1e309",
                                     "9999999999999999999",
                                     "none",
                                     "namespace(",
                                     "{% macro q(a) %}{{ q(a) }}{% endmacro %}",
                                     "{{ q(1) }}",
                                     "* 99999",
                                     "\\",
                                     "\\u"};
  std::mt19937 rng(12345);
  int parsed = 0;
  int rendered = 0;
  for (int iter = 0; iter < 2000; ++iter) {
    std::string s = sources[rng() % sources.size()];
    int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      size_t pos = s.empty() ? 0 : rng() % (s.size() + 1);
      switch (rng() % 4) {
        case 0:  // delete a span
          if (!s.empty()) {
            s.erase(std::min(pos, s.size() - 1), 1 + rng() % 8);
          }
          break;
        case 1:  // insert a fragment
          s.insert(pos, kFragments[rng() % (sizeof(kFragments) / sizeof(kFragments[0]))]);
          break;
        case 2:  // flip a byte
          if (!s.empty()) {
            s[std::min(pos, s.size() - 1)] = static_cast<char>(rng() % 256);
          }
          break;
        case 3: {  // duplicate a span
          if (!s.empty()) {
            size_t from = rng() % s.size();
            s.insert(pos, s.substr(from, 1 + rng() % 40));
          }
          break;
        }
      }
    }
    auto tmpl = ChatTemplate::Parse(s);
    if (!tmpl.ok()) {
      EXPECT_EQ(tmpl.status().code(), absl::StatusCode::kInvalidArgument) << tmpl.status();
      continue;
    }
    ++parsed;
    auto out = tmpl->Render(contexts[rng() % contexts.size()]);
    if (out.ok()) {
      ++rendered;
    } else {
      EXPECT_TRUE(out.status().code() == absl::StatusCode::kInvalidArgument ||
                  out.status().code() == absl::StatusCode::kResourceExhausted)
          << out.status();
    }
  }
  // The mutations must not all be trivially rejected, or the test would prove little.
  EXPECT_GT(parsed, 200);
  EXPECT_GT(rendered, 100);
}

// ---- tokenizer_config.json

TEST(ChatTemplateConfigTest, ReadsStringListAndMissing) {
  auto s = ChatTemplateFromTokenizerConfig(json{{"chat_template", "{{ x }}"}});
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(*s, "{{ x }}");

  json list = {{"chat_template", json::array({{{"name", "tool_use"}, {"template", "T"}},
                                              {{"name", "default"}, {"template", "D"}}})}};
  s = ChatTemplateFromTokenizerConfig(list);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(*s, "D");

  json no_default = {{"chat_template", json::array({{{"name", "rag"}, {"template", "R"}}})}};
  EXPECT_EQ(ChatTemplateFromTokenizerConfig(no_default).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(ChatTemplateFromTokenizerConfig(json{{"bos_token", "<s>"}}).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(ChatTemplateFromTokenizerConfig(json{{"chat_template", nullptr}}).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(ChatTemplateFromTokenizerConfig(json{{"chat_template", 5}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ChatTemplateFromTokenizerConfig(json::array()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ChatTemplateConfigTest, FixtureConfigsParse) {
  for (const char* model : {"llama3_1", "qwen3"}) {
    auto config = testing_util::ReadJson(
        testing_util::TestData(std::string("tokenizers/") + model + "/tokenizer_config.json"));
    auto source = ChatTemplateFromTokenizerConfig(config);
    ASSERT_TRUE(source.ok()) << model << ": " << source.status();
    EXPECT_EQ(*source, TemplateSource(model));
    EXPECT_TRUE(ChatTemplate::Parse(*source).ok()) << model;
  }
  auto demo =
      testing_util::ReadJson(testing_util::TestData("tokenizers/demo/tokenizer_config.json"));
  auto source = ChatTemplateFromTokenizerConfig(demo);
  EXPECT_TRUE(source.ok() || source.status().code() == absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace tandem
