// Tests of config.json and generation_config.json parsing: the fixture and demo models, every
// refusal rule, and the fingerprint.
#include "engine/model_config.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace tandem {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Json = nlohmann::json;

std::string ModelDir(const std::string& name) {
  return std::string(TANDEM_TEST_DATA_DIR) + "/models/" + name;
}

ModelConfig LoadFixture(const std::string& dir) {
  absl::StatusOr<ModelConfig> config = ModelConfig::FromFile(dir + "/config.json");
  EXPECT_TRUE(config.ok()) << config.status();
  return config.value_or(ModelConfig{});
}

// A small valid Llama config that the rejection tests mutate one field at a time.
Json BaseConfig() {
  return Json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4,
    "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "rope_scaling": null, "tie_word_embeddings": false,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"})");
}

absl::StatusOr<ModelConfig> Parse(const Json& j) { return ModelConfig::FromJson(j.dump()); }

void ExpectRefused(const Json& j, const std::string& needle) {
  SCOPED_TRACE(j.dump());
  absl::StatusOr<ModelConfig> config = Parse(j);
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(config.status().message(), HasSubstr(needle));
}

// --- Fixtures --------------------------------------------------------------------------------

TEST(ModelConfigFixtureTest, Llama3Gqa) {
  const ModelConfig c = LoadFixture(ModelDir("llama3_gqa_bf16"));
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.model_type, "llama");
  EXPECT_EQ(c.vocab_size, 1024);
  EXPECT_EQ(c.hidden_size, 128);
  EXPECT_EQ(c.intermediate_size, 384);
  EXPECT_EQ(c.num_layers, 2);
  EXPECT_EQ(c.num_heads, 4);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_FLOAT_EQ(c.rms_norm_eps, 1e-5f);
  EXPECT_FLOAT_EQ(c.rope_theta, 500000.0f);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kLlama3);
  EXPECT_FLOAT_EQ(c.rope_scaling.factor, 8.0f);
  EXPECT_FLOAT_EQ(c.rope_scaling.low_freq_factor, 1.0f);
  EXPECT_FLOAT_EQ(c.rope_scaling.high_freq_factor, 4.0f);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_FALSE(c.sliding_window.has_value());
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_THAT(c.eos_token_ids, ElementsAre(2));
  EXPECT_EQ(c.torch_dtype, DType::kBF16);
}

TEST(ModelConfigFixtureTest, Qwen2TiedBias) {
  const ModelConfig c = LoadFixture(ModelDir("qwen2_tied_bias_bf16"));
  EXPECT_EQ(c.architecture, "Qwen2ForCausalLM");
  EXPECT_EQ(c.model_type, "qwen2");
  EXPECT_EQ(c.vocab_size, 768);
  EXPECT_EQ(c.intermediate_size, 256);
  EXPECT_EQ(c.head_dim, 32);  // defaulted: 128 / 4
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_FALSE(c.sliding_window.has_value());  // use_sliding_window is false
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kNone);
  EXPECT_FLOAT_EQ(c.rope_theta, 1e6f);
  EXPECT_FLOAT_EQ(c.rms_norm_eps, 1e-6f);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  EXPECT_EQ(c.torch_dtype, DType::kBF16);
}

TEST(ModelConfigFixtureTest, Llama2Mha) {
  const ModelConfig c = LoadFixture(ModelDir("llama2_mha_f16"));
  EXPECT_EQ(c.num_heads, 4);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.num_layers, 3);
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kNone);
  EXPECT_FLOAT_EQ(c.rope_theta, 10000.0f);
  EXPECT_EQ(c.max_position_embeddings, 4096);
  EXPECT_EQ(c.torch_dtype, DType::kF16);
}

TEST(ModelConfigFixtureTest, MistralHeadDimDiffersFromHiddenOverHeads) {
  const ModelConfig c = LoadFixture(ModelDir("mistral_gqa_headdim_f32"));
  EXPECT_EQ(c.architecture, "MistralForCausalLM");
  EXPECT_EQ(c.model_type, "mistral");
  EXPECT_EQ(c.hidden_size, 128);
  EXPECT_EQ(c.num_heads, 4);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_NE(c.head_dim, c.hidden_size / c.num_heads);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.vocab_size, 640);
  EXPECT_FALSE(c.sliding_window.has_value());  // null in the file
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(c.torch_dtype, DType::kF32);
}

TEST(ModelConfigFixtureTest, DemoModel) {
  const ModelConfig c = LoadFixture(TANDEM_DEMO_MODEL_DIR);
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.vocab_size, 2048);
  EXPECT_EQ(c.hidden_size, 256);
  EXPECT_EQ(c.intermediate_size, 704);
  EXPECT_EQ(c.num_layers, 4);
  EXPECT_EQ(c.num_heads, 4);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.max_position_embeddings, 512);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.bos_token_id, 2046);
  EXPECT_THAT(c.eos_token_ids, ElementsAre(2047));
  EXPECT_EQ(c.torch_dtype, DType::kBF16);
}

TEST(ModelConfigFixtureTest, FingerprintsDifferAcrossModelsAndAreStable) {
  std::vector<uint64_t> prints;
  for (const std::string& dir :
       {ModelDir("llama3_gqa_bf16"), ModelDir("qwen2_tied_bias_bf16"), ModelDir("llama2_mha_f16"),
        ModelDir("mistral_gqa_headdim_f32"), std::string(TANDEM_DEMO_MODEL_DIR)}) {
    const ModelConfig c = LoadFixture(dir);
    EXPECT_EQ(c.Fingerprint(), LoadFixture(dir).Fingerprint());
    for (uint64_t p : prints) {
      EXPECT_NE(p, c.Fingerprint()) << dir;
    }
    prints.push_back(c.Fingerprint());
  }
}

// --- Defaults and per-architecture rules -----------------------------------------------------

TEST(ModelConfigTest, DefaultsWhenOptionalFieldsAreAbsent) {
  Json j = BaseConfig();
  for (const char* key : {"num_key_value_heads", "rope_theta", "rope_scaling", "torch_dtype",
                          "hidden_act", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                          "rms_norm_eps", "max_position_embeddings", "model_type"}) {
    j.erase(key);
  }
  absl::StatusOr<ModelConfig> c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_type, "llama");
  EXPECT_EQ(c->num_kv_heads, 8);
  EXPECT_EQ(c->head_dim, 32);
  EXPECT_FLOAT_EQ(c->rope_theta, 10000.0f);
  EXPECT_EQ(c->rope_scaling.type, RopeScalingType::kNone);
  EXPECT_EQ(c->torch_dtype, DType::kF32);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_FALSE(c->bos_token_id.has_value());
  EXPECT_TRUE(c->eos_token_ids.empty());
  EXPECT_GT(c->max_position_embeddings, 0);
  EXPECT_GT(c->rms_norm_eps, 0.0f);
}

TEST(ModelConfigTest, NullMeansUnset) {
  Json j = BaseConfig();
  j["num_key_value_heads"] = nullptr;
  j["head_dim"] = nullptr;
  j["bos_token_id"] = nullptr;
  j["eos_token_id"] = nullptr;
  absl::StatusOr<ModelConfig> c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_kv_heads, 8);
  EXPECT_EQ(c->head_dim, 32);
  EXPECT_FALSE(c->bos_token_id.has_value());
  EXPECT_TRUE(c->eos_token_ids.empty());
}

TEST(ModelConfigTest, EosTokenList) {
  Json j = BaseConfig();
  j["eos_token_id"] = {2, 7, 9};
  absl::StatusOr<ModelConfig> c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids, ElementsAre(2, 7, 9));
}

TEST(ModelConfigTest, RopeScalingVariants) {
  Json j = BaseConfig();
  j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2.0}};
  absl::StatusOr<ModelConfig> c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.type, RopeScalingType::kLinear);
  EXPECT_FLOAT_EQ(c->rope_scaling.factor, 2.0f);

  j["rope_scaling"] = {{"type", "linear"}, {"factor", 4}};  // the older key
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.type, RopeScalingType::kLinear);
  EXPECT_FLOAT_EQ(c->rope_scaling.factor, 4.0f);

  j["rope_scaling"] = {{"rope_type", "default"}};
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.type, RopeScalingType::kNone);

  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 32.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.type, RopeScalingType::kLlama3);
  EXPECT_FLOAT_EQ(c->rope_scaling.factor, 32.0f);
}

TEST(ModelConfigTest, Qwen3HasQkNormAndOptionalBias) {
  Json j = BaseConfig();
  j["architectures"] = {"Qwen3ForCausalLM"};
  j["model_type"] = "qwen3";
  j["head_dim"] = 128;  // Qwen3 sets head_dim independently of hidden/heads
  absl::StatusOr<ModelConfig> c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->qk_norm);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_EQ(c->head_dim, 128);

  j["attention_bias"] = true;
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->attention_bias);

  j["use_sliding_window"] = false;
  j["sliding_window"] = 4096;
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->sliding_window.has_value());

  j["use_sliding_window"] = true;
  ExpectRefused(j, "use_sliding_window is not supported");
}

TEST(ModelConfigTest, Qwen2BiasIsAlwaysOnAndSlidingWindowRefused) {
  Json j = BaseConfig();
  j["architectures"] = {"Qwen2ForCausalLM"};
  j["model_type"] = "qwen2";
  absl::StatusOr<ModelConfig> c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->attention_bias);
  EXPECT_FALSE(c->qk_norm);
  j["use_sliding_window"] = true;
  ExpectRefused(j, "use_sliding_window is not supported");
}

TEST(ModelConfigTest, LlamaAttentionBiasFollowsConfig) {
  Json j = BaseConfig();
  j["attention_bias"] = true;
  absl::StatusOr<ModelConfig> c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->attention_bias);
}

TEST(ModelConfigTest, MistralSlidingWindow) {
  Json j = BaseConfig();
  j["architectures"] = {"MistralForCausalLM"};
  j["model_type"] = "mistral";
  j["sliding_window"] = 4096;
  absl::StatusOr<ModelConfig> c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->sliding_window, 4096);
  j["sliding_window"] = 0;
  ExpectRefused(j, "sliding_window");
}

TEST(ModelConfigTest, FingerprintFollowsHyperParameters) {
  const Json j = BaseConfig();
  const uint64_t base = Parse(j)->Fingerprint();
  auto changed = [&](const char* key, const Json& value) {
    Json k = j;
    k[key] = value;
    absl::StatusOr<ModelConfig> c = Parse(k);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? c->Fingerprint() : base;
  };
  EXPECT_NE(changed("rope_theta", 500000.0), base);
  EXPECT_NE(changed("head_dim", 64), base);
  EXPECT_NE(changed("num_key_value_heads", 2), base);
  EXPECT_NE(changed("rms_norm_eps", 1e-6), base);
  EXPECT_NE(changed("torch_dtype", "float16"), base);
  EXPECT_NE(changed("tie_word_embeddings", true), base);
  // Token ids are not hyper-parameters of the network.
  EXPECT_EQ(changed("eos_token_id", 3), base);
}

// --- Refusals --------------------------------------------------------------------------------

TEST(ModelConfigRejectTest, UnknownArchitecture) {
  Json j = BaseConfig();
  j["architectures"] = {"GPT2LMHeadModel"};
  ExpectRefused(j, "unsupported architecture 'GPT2LMHeadModel' (field architectures)");
  j["architectures"] = Json::array();
  ExpectRefused(j, "architectures");
  j["architectures"] = "LlamaForCausalLM";
  ExpectRefused(j, "architectures");
  j.erase("architectures");
  ExpectRefused(j, "architectures");
}

TEST(ModelConfigRejectTest, ModelTypeMustMatchArchitecture) {
  Json j = BaseConfig();
  j["model_type"] = "qwen2";
  ExpectRefused(j, "model_type");
}

TEST(ModelConfigRejectTest, HiddenActGelu) {
  Json j = BaseConfig();
  j["hidden_act"] = "gelu";
  ExpectRefused(j, "hidden_act");
  ExpectRefused(j, "gelu");
}

TEST(ModelConfigRejectTest, UnsupportedRopeScaling) {
  for (const char* type : {"yarn", "dynamic", "longrope", "su", "ntk"}) {
    Json j = BaseConfig();
    j["rope_scaling"] = {{"rope_type", type}, {"factor", 4.0}};
    ExpectRefused(j, "rope_scaling.rope_type");
    ExpectRefused(j, type);
  }
  Json j = BaseConfig();
  j["rope_scaling"] = {{"factor", 4.0}};
  ExpectRefused(j, "rope_scaling.rope_type");
  j["rope_scaling"] = "linear";
  ExpectRefused(j, "rope_scaling");
  j["rope_scaling"] = {{"rope_type", "linear"}};
  ExpectRefused(j, "rope_scaling.factor");
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 4.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  ExpectRefused(j, "rope_scaling.high_freq_factor");
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}};
  ExpectRefused(j, "rope_scaling.");
}

TEST(ModelConfigRejectTest, KvHeadsMustDivideHeads) {
  Json j = BaseConfig();
  j["num_key_value_heads"] = 3;
  ExpectRefused(j, "num_key_value_heads");
}

TEST(ModelConfigRejectTest, HeadDimMustDivideWhenDefaulted) {
  Json j = BaseConfig();
  j["hidden_size"] = 250;
  ExpectRefused(j, "head_dim");
  j["head_dim"] = 32;  // explicit head_dim needs no divisibility
  EXPECT_TRUE(Parse(j).ok());
}

TEST(ModelConfigRejectTest, NonPositiveSizes) {
  for (const char* key :
       {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"}) {
    for (int64_t v : {int64_t{0}, int64_t{-4}}) {
      Json j = BaseConfig();
      j[key] = v;
      ExpectRefused(j, key);
    }
  }
  Json j = BaseConfig();
  j["hidden_size"] = int64_t{1} << 40;
  ExpectRefused(j, "hidden_size");
  j = BaseConfig();
  j["rms_norm_eps"] = -1e-5;
  ExpectRefused(j, "rms_norm_eps");
  j = BaseConfig();
  j["rope_theta"] = 0;
  ExpectRefused(j, "rope_theta");
  j = BaseConfig();
  j["head_dim"] = 1 << 30;
  ExpectRefused(j, "head_dim");
}

TEST(ModelConfigRejectTest, RequiredFieldsMissing) {
  for (const char* key : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads"}) {
    Json j = BaseConfig();
    j.erase(key);
    ExpectRefused(j, key);
  }
}

TEST(ModelConfigRejectTest, WrongTypes) {
  const std::vector<std::pair<const char*, Json>> cases = {
      {"hidden_size", "256"},
      {"vocab_size", 1000.5},
      {"num_hidden_layers", true},
      {"num_attention_heads", Json::array({8})},
      {"rope_theta", "1e4"},
      {"rms_norm_eps", Json::object()},
      {"tie_word_embeddings", "no"},
      {"attention_bias", 1},
      {"mlp_bias", "false"},
      {"hidden_act", 1},
      {"torch_dtype", 16},
      {"bos_token_id", "1"},
      {"eos_token_id", Json::array({2, "3"})},
      {"max_position_embeddings", 1e30},
      {"head_dim", "64"},
      {"vocab_size", 1e30},
  };
  for (const auto& [key, value] : cases) {
    Json j = BaseConfig();
    j[key] = value;
    ExpectRefused(j, key);
  }
}

TEST(ModelConfigRejectTest, TokenIdsOutsideVocab) {
  Json j = BaseConfig();
  j["bos_token_id"] = 1000;
  ExpectRefused(j, "bos_token_id");
  j = BaseConfig();
  j["eos_token_id"] = {2, -1};
  ExpectRefused(j, "eos_token_id");
  j = BaseConfig();
  j["bos_token_id"] = {1, 2};
  ExpectRefused(j, "bos_token_id");
}

TEST(ModelConfigRejectTest, MlpBiasAndDType) {
  Json j = BaseConfig();
  j["mlp_bias"] = true;
  ExpectRefused(j, "mlp_bias");
  for (const char* dtype : {"float64", "int8", "float8_e4m3fn", "bf16"}) {
    j = BaseConfig();
    j["torch_dtype"] = dtype;
    ExpectRefused(j, "torch_dtype");
  }
  j = BaseConfig();
  j.erase("torch_dtype");
  j["dtype"] = "float16";  // the newer transformers key
  absl::StatusOr<ModelConfig> c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->torch_dtype, DType::kF16);
}

TEST(ModelConfigRejectTest, MalformedJson) {
  for (const std::string text :
       {"", "{", "{\"vocab_size\": }", "[1,2]", "null", "{'a': 1}", "\xff", "{\"a\":1}}"}) {
    SCOPED_TRACE(text);
    absl::StatusOr<ModelConfig> c = ModelConfig::FromJson(text);
    ASSERT_FALSE(c.ok());
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  }
  absl::StatusOr<ModelConfig> c = ModelConfig::FromJson("{\"vocab_size\": }");
  EXPECT_THAT(c.status().message(), HasSubstr("malformed JSON"));
  EXPECT_THAT(c.status().message(), HasSubstr("parse error"));
}

TEST(ModelConfigRejectTest, FromFileErrorsNameThePath) {
  absl::StatusOr<ModelConfig> c = ModelConfig::FromFile("/nonexistent/config.json");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(c.status().message(), HasSubstr("/nonexistent/config.json"));

  const std::string path =
      ::testing::TempDir() + "/tandem_bad_config_" + std::to_string(::getpid()) + ".json";
  std::ofstream(path) << R"({"architectures": ["BertModel"]})";
  c = ModelConfig::FromFile(path);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr(path));
  EXPECT_THAT(c.status().message(), HasSubstr("BertModel"));
  std::filesystem::remove(path);
}

// --- generation_config.json ------------------------------------------------------------------

TEST(GenerationDefaultsTest, DemoModel) {
  absl::StatusOr<GenerationDefaults> g = GenerationDefaults::FromFileOrEmpty(
      std::string(TANDEM_DEMO_MODEL_DIR) + "/generation_config.json");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->bos_token_id, 2046);
  EXPECT_THAT(g->eos_token_ids, ElementsAre(2047));
  EXPECT_EQ(g->do_sample, true);
  EXPECT_FLOAT_EQ(g->temperature.value_or(0), 0.8f);
  EXPECT_FLOAT_EQ(g->top_p.value_or(0), 0.95f);
  EXPECT_FALSE(g->top_k.has_value());
  EXPECT_FALSE(g->min_p.has_value());
  EXPECT_FALSE(g->repetition_penalty.has_value());
  EXPECT_FALSE(g->max_new_tokens.has_value());
}

TEST(GenerationDefaultsTest, FixtureModels) {
  for (const char* name :
       {"llama3_gqa_bf16", "qwen2_tied_bias_bf16", "llama2_mha_f16", "mistral_gqa_headdim_f32"}) {
    absl::StatusOr<GenerationDefaults> g =
        GenerationDefaults::FromFileOrEmpty(ModelDir(name) + "/generation_config.json");
    ASSERT_TRUE(g.ok()) << g.status();
    EXPECT_EQ(g->bos_token_id, 1);
    EXPECT_THAT(g->eos_token_ids, ElementsAre(2));
    EXPECT_FALSE(g->temperature.has_value());
  }
}

TEST(GenerationDefaultsTest, AllFields) {
  absl::StatusOr<GenerationDefaults> g = GenerationDefaults::FromJson(R"({
      "eos_token_id": [128001, 128008, 128009], "bos_token_id": 128000, "do_sample": false,
      "temperature": 0.6, "top_p": 0.9, "top_k": 50, "min_p": 0.05,
      "repetition_penalty": 1.1, "max_new_tokens": 256, "max_length": 4096,
      "transformers_version": "4.47.1"})");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_THAT(g->eos_token_ids, ElementsAre(128001, 128008, 128009));
  EXPECT_EQ(g->bos_token_id, 128000);
  EXPECT_EQ(g->do_sample, false);
  EXPECT_FLOAT_EQ(*g->temperature, 0.6f);
  EXPECT_FLOAT_EQ(*g->top_p, 0.9f);
  EXPECT_EQ(g->top_k, 50);
  EXPECT_FLOAT_EQ(*g->min_p, 0.05f);
  EXPECT_FLOAT_EQ(*g->repetition_penalty, 1.1f);
  EXPECT_EQ(g->max_new_tokens, 256);
}

TEST(GenerationDefaultsTest, EmptyAndNullFieldsStayUnset) {
  absl::StatusOr<GenerationDefaults> g = GenerationDefaults::FromJson("{}");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_TRUE(g->eos_token_ids.empty());
  EXPECT_FALSE(g->temperature.has_value());
  g = GenerationDefaults::FromJson(R"({"temperature": null, "eos_token_id": null, "top_k": null})");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_FALSE(g->temperature.has_value());
  EXPECT_FALSE(g->top_k.has_value());
  EXPECT_TRUE(g->eos_token_ids.empty());
}

TEST(GenerationDefaultsTest, WrongTypesNameTheField) {
  const std::vector<std::pair<const char*, std::string>> cases = {
      {"temperature", R"("0.7")"},
      {"do_sample", "1"},
      {"top_k", "1.5"},
      {"eos_token_id", R"("2")"},
      {"bos_token_id", "[1]"},
      {"top_p", "true"},
      {"min_p", "[]"},
      {"repetition_penalty", "{}"},
      {"max_new_tokens", "-1"},
      {"top_p", "1.5"},
      {"temperature", "-0.5"},
      {"top_k", "-1"},
      {"eos_token_id", "[1, 2.5]"},
      {"max_new_tokens", "1e12"},
  };
  for (const auto& [key, value] : cases) {
    const std::string text = std::string(R"({")") + key + R"(": )" + value + "}";
    SCOPED_TRACE(text);
    absl::StatusOr<GenerationDefaults> g = GenerationDefaults::FromJson(text);
    ASSERT_FALSE(g.ok());
    EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(g.status().message(), HasSubstr(key));
  }
}

TEST(GenerationDefaultsTest, MissingFileIsEmptyMalformedIsError) {
  absl::StatusOr<GenerationDefaults> g =
      GenerationDefaults::FromFileOrEmpty("/nonexistent/generation_config.json");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_TRUE(g->eos_token_ids.empty());
  EXPECT_FALSE(g->do_sample.has_value());

  const std::string path =
      ::testing::TempDir() + "/tandem_bad_generation_" + std::to_string(::getpid()) + ".json";
  std::ofstream(path) << "{\"temperature\": 0.7,";
  g = GenerationDefaults::FromFileOrEmpty(path);
  EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(g.status().message(), HasSubstr(path));
  EXPECT_THAT(g.status().message(), HasSubstr("malformed JSON"));
  std::filesystem::remove(path);

  for (const std::string text : {"", "[]", "{"}) {
    EXPECT_FALSE(GenerationDefaults::FromJson(text).ok()) << text;
  }
}

}  // namespace
}  // namespace tandem
