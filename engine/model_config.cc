// Parsing and validation of config.json and generation_config.json. Both files come from an
// untrusted model folder: every field is type-checked, sizes are range-checked, and anything the
// engine does not implement is refused by name rather than silently ignored.
#include "engine/model_config.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "xxhash.h"

namespace tandem {
namespace {

using Json = nlohmann::json;

// config.json of real models is a few KB; anything past this is not a config.
constexpr size_t kMaxConfigBytes = 16u << 20;

// Returns early with the status of `expr` when it is not OK; otherwise moves its value into
// `lhs`. Local to this file: the checks below are long lists of fallible field reads.
#define TANDEM_CONFIG_CONCAT_INNER(a, b) a##b
#define TANDEM_CONFIG_CONCAT(a, b) TANDEM_CONFIG_CONCAT_INNER(a, b)
#define TANDEM_CONFIG_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                        \
  if (!tmp.ok()) {                                          \
    return tmp.status();                                    \
  }                                                         \
  lhs = *std::move(tmp)
#define ASSIGN_FIELD_OR_RETURN(lhs, expr) \
  TANDEM_CONFIG_ASSIGN_OR_RETURN_IMPL(TANDEM_CONFIG_CONCAT(status_or_, __LINE__), lhs, expr)

struct Architecture {
  const char* name;
  const char* model_type;
  int64_t default_max_position_embeddings;  // transformers' default for the model type
};

constexpr Architecture kArchitectures[] = {
    {"LlamaForCausalLM", "llama", 2048},
    {"MistralForCausalLM", "mistral", 4096 * 32},
    {"Qwen2ForCausalLM", "qwen2", 32768},
    {"Qwen3ForCausalLM", "qwen3", 32768},
};

// A value echoed from the untrusted file into a message: quoted, escaped and bounded.
std::string Quoted(absl::string_view value) {
  constexpr size_t kMaxChars = 64;
  return absl::StrCat("'", absl::CHexEscape(value.substr(0, kMaxChars)),
                      value.size() > kMaxChars ? "...'" : "'");
}

absl::Status FieldError(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("config field ", field, ": ", what));
}

absl::StatusOr<Json> ParseObject(std::string_view text, absl::string_view what) {
  Json root;
  try {
    root = Json::parse(text.begin(), text.end());
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("malformed JSON in ", what, ": ", e.what()));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " is a JSON ", root.type_name(), ", expected an object"));
  }
  return root;
}

// Typed, optional reads of one JSON object's fields. A missing field and an explicit null both
// read as "unset"; a value of the wrong JSON type is an error naming the field (with `prefix`,
// e.g. "rope_scaling.").
class FieldReader {
 public:
  FieldReader(const Json& object, std::string prefix)
      : object_(object), prefix_(std::move(prefix)) {}

  const Json* Get(std::string_view key) const {
    const auto it = object_.find(key);
    if (it == object_.end() || it->is_null()) {
      return nullptr;
    }
    return &*it;
  }

  std::string Name(std::string_view key) const { return prefix_ + std::string(key); }

  absl::StatusOr<std::optional<int64_t>> Int(std::string_view key) const {
    const Json* v = Get(key);
    if (v == nullptr) {
      return std::nullopt;
    }
    if (v->is_number_unsigned()) {
      const uint64_t u = v->get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return FieldError(Name(key), "integer out of range");
      }
      return static_cast<int64_t>(u);
    }
    if (v->is_number_integer()) {
      return v->get<int64_t>();
    }
    return FieldError(Name(key), absl::StrCat("expected an integer, got ", v->type_name()));
  }

  absl::StatusOr<std::optional<double>> Number(std::string_view key) const {
    const Json* v = Get(key);
    if (v == nullptr) {
      return std::nullopt;
    }
    if (!v->is_number()) {
      return FieldError(Name(key), absl::StrCat("expected a number, got ", v->type_name()));
    }
    const double d = v->get<double>();
    // A float field holding 1e300 would become Inf: refuse rather than compute with it.
    if (!std::isfinite(d) || std::fabs(d) > std::numeric_limits<float>::max()) {
      return FieldError(Name(key), "number out of range");
    }
    return d;
  }

  absl::StatusOr<std::optional<bool>> Bool(std::string_view key) const {
    const Json* v = Get(key);
    if (v == nullptr) {
      return std::nullopt;
    }
    if (!v->is_boolean()) {
      return FieldError(Name(key), absl::StrCat("expected a boolean, got ", v->type_name()));
    }
    return v->get<bool>();
  }

  absl::StatusOr<std::optional<std::string>> String(std::string_view key) const {
    const Json* v = Get(key);
    if (v == nullptr) {
      return std::nullopt;
    }
    if (!v->is_string()) {
      return FieldError(Name(key), absl::StrCat("expected a string, got ", v->type_name()));
    }
    return v->get<std::string>();
  }

  // An int32 in [min, max], or `fallback` when unset (nullopt fallback: the field is required).
  absl::StatusOr<int32_t> Int32InRange(std::string_view key, int64_t min, int64_t max,
                                       std::optional<int64_t> fallback) const {
    ASSIGN_FIELD_OR_RETURN(const std::optional<int64_t> v, Int(key));
    if (!v.has_value()) {
      if (!fallback.has_value()) {
        return FieldError(Name(key), "required but missing");
      }
      return static_cast<int32_t>(*fallback);
    }
    if (*v < min || *v > max) {
      return FieldError(Name(key), absl::StrCat(*v, " is outside [", min, ", ", max, "]"));
    }
    return static_cast<int32_t>(*v);
  }

  absl::StatusOr<int32_t> PositiveInt32(std::string_view key,
                                        std::optional<int64_t> fallback = std::nullopt) const {
    return Int32InRange(key, 1, std::numeric_limits<int32_t>::max(), fallback);
  }

  absl::StatusOr<int64_t> PositiveInt64(std::string_view key,
                                        std::optional<int64_t> fallback = std::nullopt) const {
    ASSIGN_FIELD_OR_RETURN(const std::optional<int64_t> v, Int(key));
    if (!v.has_value()) {
      if (!fallback.has_value()) {
        return FieldError(Name(key), "required but missing");
      }
      return *fallback;
    }
    if (*v <= 0) {
      return FieldError(Name(key), absl::StrCat(*v, " is not positive"));
    }
    return *v;
  }

  absl::StatusOr<float> PositiveFloat(std::string_view key,
                                      std::optional<double> fallback = std::nullopt) const {
    ASSIGN_FIELD_OR_RETURN(const std::optional<double> v, Number(key));
    if (!v.has_value()) {
      if (!fallback.has_value()) {
        return FieldError(Name(key), "required but missing");
      }
      return static_cast<float>(*fallback);
    }
    if (!(*v > 0)) {
      return FieldError(Name(key), absl::StrCat(*v, " is not positive"));
    }
    return static_cast<float>(*v);
  }

 private:
  const Json& object_;
  std::string prefix_;
};

// One token id; ids must index the vocabulary when its size is known.
absl::StatusOr<int32_t> TokenId(const Json& item, absl::string_view field,
                                std::optional<int64_t> vocab_size) {
  if (!item.is_number_integer()) {
    return FieldError(field, absl::StrCat("expected an integer token id, got ", item.type_name()));
  }
  const int64_t limit = vocab_size.value_or(std::numeric_limits<int32_t>::max());
  // Non-negative integers parse as unsigned; a signed one here is negative.
  if (!item.is_number_unsigned() || item.get<uint64_t>() >= static_cast<uint64_t>(limit)) {
    return FieldError(field,
                      absl::StrCat("token id ", item.dump(), " is outside [0, ", limit, ")"));
  }
  return static_cast<int32_t>(item.get<uint64_t>());
}

// bos_token_id: an int, or null/missing.
absl::StatusOr<std::optional<int32_t>> SingleTokenId(const FieldReader& r, std::string_view key,
                                                     std::optional<int64_t> vocab_size) {
  const Json* v = r.Get(key);
  if (v == nullptr) {
    return std::nullopt;
  }
  ASSIGN_FIELD_OR_RETURN(const int32_t id, TokenId(*v, r.Name(key), vocab_size));
  return id;
}

// eos_token_id: an int, a list of ints, or null/missing (empty).
absl::StatusOr<std::vector<int32_t>> TokenIdList(const FieldReader& r, std::string_view key,
                                                 std::optional<int64_t> vocab_size) {
  std::vector<int32_t> ids;
  const Json* v = r.Get(key);
  if (v == nullptr) {
    return ids;
  }
  if (!v->is_array()) {
    ASSIGN_FIELD_OR_RETURN(const int32_t id, TokenId(*v, r.Name(key), vocab_size));
    ids.push_back(id);
    return ids;
  }
  for (const Json& item : *v) {
    ASSIGN_FIELD_OR_RETURN(const int32_t id, TokenId(item, r.Name(key), vocab_size));
    ids.push_back(id);
  }
  return ids;
}

absl::StatusOr<RopeScaling> ParseRopeScaling(const FieldReader& config) {
  RopeScaling scaling;
  const Json* v = config.Get("rope_scaling");
  if (v == nullptr) {
    return scaling;
  }
  if (!v->is_object()) {
    return FieldError("rope_scaling",
                      absl::StrCat("expected an object or null, got ", v->type_name()));
  }
  const FieldReader r(*v, "rope_scaling.");
  // transformers renamed "type" to "rope_type"; configs in the wild carry either.
  ASSIGN_FIELD_OR_RETURN(std::optional<std::string> type, r.String("rope_type"));
  if (!type.has_value()) {
    ASSIGN_FIELD_OR_RETURN(type, r.String("type"));
  }
  if (!type.has_value()) {
    return FieldError("rope_scaling.rope_type", "missing");
  }
  if (*type == "default") {
    return scaling;
  }
  if (*type == "linear") {
    scaling.type = RopeScalingType::kLinear;
    ASSIGN_FIELD_OR_RETURN(scaling.factor, r.PositiveFloat("factor"));
    return scaling;
  }
  if (*type == "llama3") {
    scaling.type = RopeScalingType::kLlama3;
    ASSIGN_FIELD_OR_RETURN(scaling.factor, r.PositiveFloat("factor"));
    ASSIGN_FIELD_OR_RETURN(scaling.low_freq_factor, r.PositiveFloat("low_freq_factor"));
    ASSIGN_FIELD_OR_RETURN(scaling.high_freq_factor, r.PositiveFloat("high_freq_factor"));
    ASSIGN_FIELD_OR_RETURN(scaling.original_max_position_embeddings,
                           r.PositiveInt64("original_max_position_embeddings"));
    // The llama3 formula interpolates over 1 / (high - low).
    if (!(scaling.high_freq_factor > scaling.low_freq_factor)) {
      return FieldError("rope_scaling.high_freq_factor",
                        "must be greater than rope_scaling.low_freq_factor");
    }
    return scaling;
  }
  return FieldError(
      "rope_scaling.rope_type",
      absl::StrCat("unsupported value ", Quoted(*type), " (supported: default, linear, llama3)"));
}

absl::StatusOr<std::string> ReadBoundedFile(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot open ", path));
  }
  std::string out;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) {
    if (out.size() + n > kMaxConfigBytes) {
      std::fclose(f);
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": larger than the ", kMaxConfigBytes, "-byte limit"));
    }
    out.append(buf, n);
  }
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  if (failed) {
    return absl::DataLossError(absl::StrCat(path, ": read error"));
  }
  return out;
}

absl::Status WithPath(const absl::Status& s, const std::string& path) {
  return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
}

// Appends `key=value;` for the fingerprint's canonical string. Floats go in as bit patterns so
// that formatting can never make two different values collide or one value hash two ways.
void AppendField(std::string* out, absl::string_view key, float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  absl::StrAppend(out, key, "=f", bits, ";");
}
void AppendField(std::string* out, absl::string_view key, int64_t value) {
  absl::StrAppend(out, key, "=", value, ";");
}
void AppendField(std::string* out, absl::string_view key, absl::string_view value) {
  absl::StrAppend(out, key, "=", value.size(), ":", value, ";");
}

}  // namespace

absl::StatusOr<ModelConfig> ModelConfig::FromJson(std::string_view json_text) {
  ASSIGN_FIELD_OR_RETURN(const Json root, ParseObject(json_text, "config.json"));
  const FieldReader r(root, "");
  ModelConfig c;

  const Json* archs = r.Get("architectures");
  if (archs == nullptr || !archs->is_array() || archs->empty() || !(*archs)[0].is_string()) {
    return FieldError("architectures", "expected a non-empty list of strings");
  }
  const std::string& arch_name = (*archs)[0].get_ref<const std::string&>();
  const Architecture* arch = nullptr;
  for (const Architecture& a : kArchitectures) {
    if (arch_name == a.name) {
      arch = &a;
    }
  }
  if (arch == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("unsupported architecture ", Quoted(arch_name), " (field architectures)"));
  }
  c.architecture = arch->name;
  c.model_type = arch->model_type;
  ASSIGN_FIELD_OR_RETURN(const std::optional<std::string> model_type, r.String("model_type"));
  if (model_type.has_value() && *model_type != c.model_type) {
    return FieldError("model_type",
                      absl::StrCat(Quoted(*model_type), " does not match architecture ",
                                   c.architecture, " (expected '", c.model_type, "')"));
  }
  const bool is_mistral = c.model_type == "mistral";
  const bool is_qwen2 = c.model_type == "qwen2";
  const bool is_qwen3 = c.model_type == "qwen3";

  ASSIGN_FIELD_OR_RETURN(c.vocab_size, r.PositiveInt32("vocab_size"));
  ASSIGN_FIELD_OR_RETURN(c.hidden_size, r.PositiveInt32("hidden_size"));
  ASSIGN_FIELD_OR_RETURN(c.intermediate_size, r.PositiveInt32("intermediate_size"));
  ASSIGN_FIELD_OR_RETURN(c.num_layers, r.PositiveInt32("num_hidden_layers"));
  ASSIGN_FIELD_OR_RETURN(c.num_heads, r.PositiveInt32("num_attention_heads"));
  ASSIGN_FIELD_OR_RETURN(c.num_kv_heads, r.PositiveInt32("num_key_value_heads", c.num_heads));
  if (c.num_heads % c.num_kv_heads != 0) {
    return FieldError(
        "num_key_value_heads",
        absl::StrCat(c.num_kv_heads, " does not divide num_attention_heads ", c.num_heads));
  }
  ASSIGN_FIELD_OR_RETURN(const std::optional<int64_t> head_dim, r.Int("head_dim"));
  if (head_dim.has_value()) {
    ASSIGN_FIELD_OR_RETURN(c.head_dim, r.PositiveInt32("head_dim"));
  } else {
    if (c.hidden_size % c.num_heads != 0) {
      return FieldError("head_dim",
                        absl::StrCat("missing, and hidden_size ", c.hidden_size,
                                     " is not divisible by num_attention_heads ", c.num_heads));
    }
    c.head_dim = c.hidden_size / c.num_heads;
  }
  // Projection widths are computed in int32 by the engine; keep them representable.
  if (static_cast<int64_t>(c.num_heads) * c.head_dim > std::numeric_limits<int32_t>::max()) {
    return FieldError("head_dim", "num_attention_heads x head_dim overflows int32");
  }

  ASSIGN_FIELD_OR_RETURN(const std::optional<std::string> act, r.String("hidden_act"));
  if (act.has_value() && *act != "silu") {
    return FieldError("hidden_act",
                      absl::StrCat("unsupported activation ", Quoted(*act), " (supported: silu)"));
  }
  ASSIGN_FIELD_OR_RETURN(c.rms_norm_eps, r.PositiveFloat("rms_norm_eps", 1e-6));
  ASSIGN_FIELD_OR_RETURN(c.rope_theta, r.PositiveFloat("rope_theta", 10000.0));
  ASSIGN_FIELD_OR_RETURN(
      c.max_position_embeddings,
      r.PositiveInt64("max_position_embeddings", arch->default_max_position_embeddings));
  ASSIGN_FIELD_OR_RETURN(c.rope_scaling, ParseRopeScaling(r));

  ASSIGN_FIELD_OR_RETURN(const std::optional<bool> tie, r.Bool("tie_word_embeddings"));
  c.tie_word_embeddings = tie.value_or(false);
  ASSIGN_FIELD_OR_RETURN(const std::optional<bool> attention_bias, r.Bool("attention_bias"));
  // Qwen2's q/k/v projections always carry a bias; its config has no switch for it.
  c.attention_bias = is_qwen2 || attention_bias.value_or(false);
  c.qk_norm = is_qwen3;
  ASSIGN_FIELD_OR_RETURN(const std::optional<bool> mlp_bias, r.Bool("mlp_bias"));
  if (mlp_bias.value_or(false)) {
    return FieldError("mlp_bias", "true is not supported");
  }

  if (is_mistral) {
    ASSIGN_FIELD_OR_RETURN(const std::optional<int64_t> window, r.Int("sliding_window"));
    if (window.has_value()) {
      if (*window <= 0) {
        return FieldError("sliding_window", absl::StrCat(*window, " is not positive"));
      }
      c.sliding_window = *window;
    }
  } else if (is_qwen2 || is_qwen3) {
    // Qwen configs carry a sliding_window value that only applies when this switch is on.
    ASSIGN_FIELD_OR_RETURN(const std::optional<bool> use_window, r.Bool("use_sliding_window"));
    if (use_window.value_or(false)) {
      return FieldError("use_sliding_window", "use_sliding_window is not supported");
    }
  }

  ASSIGN_FIELD_OR_RETURN(c.bos_token_id, SingleTokenId(r, "bos_token_id", c.vocab_size));
  ASSIGN_FIELD_OR_RETURN(c.eos_token_ids, TokenIdList(r, "eos_token_id", c.vocab_size));

  // Newer transformers write "dtype"; older ones "torch_dtype".
  ASSIGN_FIELD_OR_RETURN(std::optional<std::string> dtype, r.String("torch_dtype"));
  absl::string_view dtype_field = "torch_dtype";
  if (!dtype.has_value()) {
    ASSIGN_FIELD_OR_RETURN(dtype, r.String("dtype"));
    dtype_field = "dtype";
  }
  if (!dtype.has_value() || *dtype == "float32") {
    c.torch_dtype = DType::kF32;
  } else if (*dtype == "bfloat16") {
    c.torch_dtype = DType::kBF16;
  } else if (*dtype == "float16") {
    c.torch_dtype = DType::kF16;
  } else {
    return FieldError(dtype_field, absl::StrCat("unsupported dtype ", Quoted(*dtype),
                                                " (supported: bfloat16, float16, float32)"));
  }
  return c;
}

absl::StatusOr<ModelConfig> ModelConfig::FromFile(const std::string& path) {
  ASSIGN_FIELD_OR_RETURN(const std::string text, ReadBoundedFile(path));
  absl::StatusOr<ModelConfig> config = FromJson(text);
  if (!config.ok()) {
    return WithPath(config.status(), path);
  }
  return config;
}

uint64_t ModelConfig::Fingerprint() const {
  // Versioned so that a change to what goes in here can never match an old fingerprint.
  std::string s = "tandem.model_config.v1;";
  AppendField(&s, "architecture", architecture);
  AppendField(&s, "model_type", model_type);
  AppendField(&s, "vocab_size", int64_t{vocab_size});
  AppendField(&s, "hidden_size", int64_t{hidden_size});
  AppendField(&s, "intermediate_size", int64_t{intermediate_size});
  AppendField(&s, "num_layers", int64_t{num_layers});
  AppendField(&s, "num_heads", int64_t{num_heads});
  AppendField(&s, "num_kv_heads", int64_t{num_kv_heads});
  AppendField(&s, "head_dim", int64_t{head_dim});
  AppendField(&s, "max_position_embeddings", max_position_embeddings);
  AppendField(&s, "rms_norm_eps", rms_norm_eps);
  AppendField(&s, "rope_theta", rope_theta);
  AppendField(&s, "rope_scaling.type", static_cast<int64_t>(rope_scaling.type));
  AppendField(&s, "rope_scaling.factor", rope_scaling.factor);
  AppendField(&s, "rope_scaling.low_freq_factor", rope_scaling.low_freq_factor);
  AppendField(&s, "rope_scaling.high_freq_factor", rope_scaling.high_freq_factor);
  AppendField(&s, "rope_scaling.original_max_position_embeddings",
              rope_scaling.original_max_position_embeddings);
  AppendField(&s, "tie_word_embeddings", int64_t{tie_word_embeddings});
  AppendField(&s, "attention_bias", int64_t{attention_bias});
  AppendField(&s, "qk_norm", int64_t{qk_norm});
  AppendField(&s, "sliding_window", sliding_window.value_or(-1));
  AppendField(&s, "torch_dtype", std::string(DTypeName(torch_dtype)));
  return XXH3_64bits(s.data(), s.size());
}

absl::StatusOr<GenerationDefaults> GenerationDefaults::FromJson(std::string_view json_text) {
  ASSIGN_FIELD_OR_RETURN(const Json root, ParseObject(json_text, "generation_config.json"));
  const FieldReader r(root, "");
  GenerationDefaults g;

  ASSIGN_FIELD_OR_RETURN(g.eos_token_ids, TokenIdList(r, "eos_token_id", std::nullopt));
  ASSIGN_FIELD_OR_RETURN(g.bos_token_id, SingleTokenId(r, "bos_token_id", std::nullopt));
  ASSIGN_FIELD_OR_RETURN(g.do_sample, r.Bool("do_sample"));

  // Only values no sampler could use are refused here; the per-request checks of DESIGN §9 apply
  // to the merged parameters later.
  auto non_negative = [&](std::string_view key) -> absl::StatusOr<std::optional<float>> {
    ASSIGN_FIELD_OR_RETURN(const std::optional<double> v, r.Number(key));
    if (!v.has_value()) {
      return std::nullopt;
    }
    if (*v < 0) {
      return FieldError(std::string(key), absl::StrCat(*v, " is negative"));
    }
    return static_cast<float>(*v);
  };
  ASSIGN_FIELD_OR_RETURN(g.temperature, non_negative("temperature"));
  ASSIGN_FIELD_OR_RETURN(g.top_p, non_negative("top_p"));
  if (g.top_p.has_value() && *g.top_p > 1.0f) {
    return FieldError("top_p", absl::StrCat(*g.top_p, " is greater than 1"));
  }
  ASSIGN_FIELD_OR_RETURN(g.min_p, non_negative("min_p"));
  if (g.min_p.has_value() && *g.min_p > 1.0f) {
    return FieldError("min_p", absl::StrCat(*g.min_p, " is greater than 1"));
  }
  ASSIGN_FIELD_OR_RETURN(g.repetition_penalty, non_negative("repetition_penalty"));
  ASSIGN_FIELD_OR_RETURN(const std::optional<int64_t> top_k, r.Int("top_k"));
  if (top_k.has_value()) {
    ASSIGN_FIELD_OR_RETURN(g.top_k,
                           r.Int32InRange("top_k", 0, std::numeric_limits<int32_t>::max(), 0));
  }
  ASSIGN_FIELD_OR_RETURN(const std::optional<int64_t> max_new, r.Int("max_new_tokens"));
  if (max_new.has_value()) {
    ASSIGN_FIELD_OR_RETURN(
        g.max_new_tokens,
        r.Int32InRange("max_new_tokens", 0, std::numeric_limits<int32_t>::max(), 0));
  }
  return g;
}

absl::StatusOr<GenerationDefaults> GenerationDefaults::FromFileOrEmpty(const std::string& path) {
  absl::StatusOr<std::string> text = ReadBoundedFile(path);
  if (!text.ok()) {
    if (absl::IsNotFound(text.status())) {
      return GenerationDefaults{};
    }
    return text.status();
  }
  absl::StatusOr<GenerationDefaults> defaults = FromJson(*text);
  if (!defaults.ok()) {
    return WithPath(defaults.status(), path);
  }
  return defaults;
}

#undef ASSIGN_FIELD_OR_RETURN
#undef TANDEM_CONFIG_ASSIGN_OR_RETURN_IMPL
#undef TANDEM_CONFIG_CONCAT
#undef TANDEM_CONFIG_CONCAT_INNER

}  // namespace tandem
