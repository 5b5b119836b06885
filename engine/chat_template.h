// Chat templates: a self-contained renderer for the subset of Jinja2 that Hugging Face chat
// templates use, with the semantics of transformers' `apply_chat_template` environment.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace tandem {

namespace chat_template_internal {
struct Program;  // the parsed template; defined in chat_template.cc
}  // namespace chat_template_internal

// A parsed template. Parsing is done once per model; rendering is const and thread-safe, so one
// ChatTemplate may serve concurrent requests.
//
// The environment is that of transformers: jinja2 with trim_blocks, lstrip_blocks and the
// loopcontrols extension (break/continue), the globals raise_exception(msg), strftime_now(fmt),
// range, namespace, and a `tojson` filter that behaves like json.dumps(ensure_ascii=False).
// Undefined variables behave like jinja2's default Undefined (printing gives "", tests are
// false, attribute access on them is an error). Templates are untrusted input: rendering is
// bounded in output size, steps and recursion, and never throws.
class ChatTemplate {
 public:
  // INVALID_ARGUMENT with "line L, column C: ..." for a syntax error or an unsupported construct
  // (the message names the construct, e.g. "unsupported construct: '{% include %}'").
  static absl::StatusOr<ChatTemplate> Parse(std::string_view source);

  // Renders with `context` (a JSON object) as the top-level variables: messages,
  // add_generation_prompt, bos_token, eos_token, tools, and any extra keyword such as
  // enable_thinking.
  //   INVALID_ARGUMENT: raise_exception(msg) was called (the message is the template's own), or
  //                     a runtime error such as a type error (the message names the problem).
  //   RESOURCE_EXHAUSTED: output or a value over 16 MiB, more than 10 million evaluation steps,
  //                     or macro recursion deeper than 64.
  // nlohmann::json keeps object keys sorted, so `tools | tojson` prints keys in sorted order;
  // the ordered_json overload keeps the caller's key order, as Python does.
  absl::StatusOr<std::string> Render(const nlohmann::json& context) const;
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& context) const;

  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;
  ~ChatTemplate();

 private:
  explicit ChatTemplate(std::shared_ptr<const chat_template_internal::Program> program);

  // Shared and immutable after Parse: copies of the handle are cheap and race-free.
  std::shared_ptr<const chat_template_internal::Program> program_;
};

// The template of a model folder's tokenizer_config.json contents: "chat_template" as a string,
// or the entry named "default" when it is a list of {name, template} objects. NOT_FOUND when the
// config has none; INVALID_ARGUMENT when "chat_template" has an unexpected shape.
absl::StatusOr<std::string> ChatTemplateFromTokenizerConfig(const nlohmann::json& config);

}  // namespace tandem
