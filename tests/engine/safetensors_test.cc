// Tests of safetensors reading and writing: the fixture models, round trips, sharded folders,
// and hostile headers (DESIGN §9: model folders are untrusted input).
#include "engine/safetensors.h"

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/model_config.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tandem {
namespace {

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::HasSubstr;

std::string ModelDir(const std::string& name) {
  return std::string(TANDEM_TEST_DATA_DIR) + "/models/" + name;
}

// A safetensors image: the 8-byte little-endian length of `header`, `header`, then `data_bytes`
// bytes of data. `declared_len` overrides the length field.
std::string MakeImage(const std::string& header, size_t data_bytes,
                      std::optional<uint64_t> declared_len = std::nullopt) {
  const uint64_t len = declared_len.value_or(header.size());
  std::string image(8, '\0');
  for (int i = 0; i < 8; ++i) {
    image[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  }
  image += header;
  for (size_t i = 0; i < data_bytes; ++i) {
    image.push_back(static_cast<char>(i * 7 + 1));
  }
  return image;
}

// An exact-size heap copy of an image (so that a read past its end trips ASan), parsed.
struct ParsedImage {
  explicit ParsedImage(const std::string& image) : bytes(image.size()) {
    if (!image.empty()) {
      std::memcpy(bytes.data(), image.data(), image.size());
    }
    file = SafetensorsFile::FromBuffer(bytes.data(), bytes.size(), "test.safetensors");
  }
  std::vector<std::byte> bytes;
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file;
};

std::vector<std::byte> RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> out(n);
  for (auto& b : out) {
    b = static_cast<std::byte>(rng() & 0xff);
  }
  return out;
}

// Creates a fresh directory under the test temp dir and removes it afterwards.
class SafetensorsDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::path(::testing::TempDir()) /
           (std::string("tandem_st_") + info->name() + "_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Path(const std::string& name) const { return (dir_ / name).string(); }
  void WriteText(const std::string& name, const std::string& text) const {
    std::ofstream(Path(name), std::ios::binary) << text;
  }

  fs::path dir_;
};

// --- Fixture models --------------------------------------------------------------------------

struct Expected {
  std::string name;
  std::vector<int64_t> shape;
};

// The tensors a Llama-family folder must hold, derived from its config.
std::vector<Expected> ExpectedTensors(const ModelConfig& c) {
  const int64_t h = c.hidden_size;
  const int64_t q = int64_t{c.num_heads} * c.head_dim;
  const int64_t kv = int64_t{c.num_kv_heads} * c.head_dim;
  const int64_t ff = c.intermediate_size;
  std::vector<Expected> out = {{"model.embed_tokens.weight", {c.vocab_size, h}},
                               {"model.norm.weight", {h}}};
  if (!c.tie_word_embeddings) {
    out.push_back({"lm_head.weight", {c.vocab_size, h}});
  }
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    out.push_back({p + "input_layernorm.weight", {h}});
    out.push_back({p + "post_attention_layernorm.weight", {h}});
    out.push_back({p + "self_attn.q_proj.weight", {q, h}});
    out.push_back({p + "self_attn.k_proj.weight", {kv, h}});
    out.push_back({p + "self_attn.v_proj.weight", {kv, h}});
    out.push_back({p + "self_attn.o_proj.weight", {h, q}});
    out.push_back({p + "mlp.gate_proj.weight", {ff, h}});
    out.push_back({p + "mlp.up_proj.weight", {ff, h}});
    out.push_back({p + "mlp.down_proj.weight", {h, ff}});
    if (c.attention_bias) {
      out.push_back({p + "self_attn.q_proj.bias", {q}});
      out.push_back({p + "self_attn.k_proj.bias", {kv}});
      out.push_back({p + "self_attn.v_proj.bias", {kv}});
    }
    if (c.qk_norm) {
      out.push_back({p + "self_attn.q_norm.weight", {c.head_dim}});
      out.push_back({p + "self_attn.k_norm.weight", {c.head_dim}});
    }
  }
  return out;
}

void CheckModelFolder(const std::string& dir) {
  SCOPED_TRACE(dir);
  absl::StatusOr<ModelConfig> config = ModelConfig::FromFile(dir + "/config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  absl::StatusOr<std::unique_ptr<WeightSet>> weights = WeightSet::OpenDir(dir);
  ASSERT_TRUE(weights.ok()) << weights.status();

  const std::vector<Expected> expected = ExpectedTensors(*config);
  size_t total = 0;
  for (const Expected& e : expected) {
    absl::StatusOr<const TensorView*> t = (*weights)->Require(e.name, e.shape);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ((*t)->name, e.name);
    EXPECT_EQ((*t)->dtype, config->torch_dtype) << e.name;
    EXPECT_EQ((*t)->nbytes, static_cast<size_t>((*t)->numel()) * DTypeSize((*t)->dtype));
    ASSERT_NE((*t)->data, nullptr);
    // Weights are finite random values: a wrong offset or dtype would show up as garbage.
    std::vector<float> values(static_cast<size_t>((*t)->numel()));
    ToF32((*t)->dtype, (*t)->data, values.data(), values.size());
    for (float v : values) {
      ASSERT_TRUE(std::isfinite(v)) << e.name;
    }
    total += (*t)->nbytes;
  }
  // Nothing beyond what the config implies.
  EXPECT_EQ((*weights)->total_bytes(), total);
  EXPECT_EQ((*weights)->Find("no.such.tensor"), nullptr);
}

TEST(SafetensorsFixtureTest, Llama3GqaBf16) { CheckModelFolder(ModelDir("llama3_gqa_bf16")); }
TEST(SafetensorsFixtureTest, Qwen2TiedBiasBf16) {
  CheckModelFolder(ModelDir("qwen2_tied_bias_bf16"));
}
TEST(SafetensorsFixtureTest, Llama2MhaF16) { CheckModelFolder(ModelDir("llama2_mha_f16")); }
TEST(SafetensorsFixtureTest, MistralGqaHeaddimF32) {
  CheckModelFolder(ModelDir("mistral_gqa_headdim_f32"));
}
TEST(SafetensorsFixtureTest, DemoModel) { CheckModelFolder(TANDEM_DEMO_MODEL_DIR); }

TEST(SafetensorsFixtureTest, FileViewsAndMetadata) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(ModelDir("llama3_gqa_bf16") + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  const TensorView* embed = (*file)->Find("model.embed_tokens.weight");
  ASSERT_NE(embed, nullptr);
  EXPECT_EQ(embed->dtype, DType::kBF16);
  EXPECT_EQ(embed->shape, (std::vector<int64_t>{1024, 128}));
  EXPECT_EQ(embed->nbytes, 1024u * 128u * 2u);
  EXPECT_EQ((*file)->tensors().size(), 2u + 1u + 2u * 9u);
}

TEST(SafetensorsFixtureTest, RequireNamesMissingAndMisshapenTensors) {
  const std::string dir = ModelDir("qwen2_tied_bias_bf16");
  absl::StatusOr<std::unique_ptr<WeightSet>> weights = WeightSet::OpenDir(dir);
  ASSERT_TRUE(weights.ok()) << weights.status();

  absl::StatusOr<const TensorView*> missing = (*weights)->Require("lm_head.weight", {768, 128});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(),
              AllOf(HasSubstr("missing tensor 'lm_head.weight'"), HasSubstr(dir)));

  absl::StatusOr<const TensorView*> wrong =
      (*weights)->Require("model.embed_tokens.weight", {128, 768});
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(wrong.status().message(),
              HasSubstr("tensor 'model.embed_tokens.weight' has shape [768,128], expected "
                        "[128,768]"));
}

// --- Writing ---------------------------------------------------------------------------------

TEST_F(SafetensorsDirTest, RoundTripIsBitExactForAllDTypes) {
  std::vector<TensorToWrite> tensors;
  uint32_t seed = 1;
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    // Random bytes include NaN and Inf patterns: the writer must not touch values.
    for (const std::vector<int64_t>& shape :
         {std::vector<int64_t>{3, 5}, std::vector<int64_t>{7}, std::vector<int64_t>{}}) {
      TensorToWrite t;
      t.name = std::string(DTypeName(dtype)) + ".rank" + std::to_string(shape.size());
      t.dtype = dtype;
      t.shape = shape;
      int64_t numel = 1;
      for (int64_t d : shape) {
        numel *= d;
      }
      t.data = RandomBytes(static_cast<size_t>(numel) * DTypeSize(dtype), seed++);
      tensors.push_back(std::move(t));
    }
  }
  tensors.push_back({"empty", DType::kF32, {0, 4}, {}});
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "tandem"}};
  ASSERT_TRUE(WriteSafetensors(Path("model.safetensors"), tensors, metadata).ok());

  // The data section starts 8-byte aligned, and no temporary file is left behind.
  std::ifstream raw(Path("model.safetensors"), std::ios::binary);
  unsigned char len[8];
  raw.read(reinterpret_cast<char*>(len), 8);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) {
    header_len = (header_len << 8) | len[i];
  }
  EXPECT_EQ(header_len % 8, 0u);
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 1);

  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(Path("model.safetensors"));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata(), metadata);
  ASSERT_EQ((*file)->tensors().size(), tensors.size());
  for (const TensorToWrite& t : tensors) {
    SCOPED_TRACE(t.name);
    const TensorView* v = (*file)->Find(t.name);
    ASSERT_NE(v, nullptr);
    EXPECT_EQ(v->dtype, t.dtype);
    EXPECT_EQ(v->shape, t.shape);
    ASSERT_EQ(v->nbytes, t.data.size());
    if (!t.data.empty()) {
      EXPECT_EQ(std::memcmp(v->data, t.data.data(), t.data.size()), 0);
    }
  }

  // The folder loads as a model folder too.
  absl::StatusOr<std::unique_ptr<WeightSet>> set = WeightSet::OpenDir(dir_.string());
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_NE((*set)->Find("bf16.rank2"), nullptr);
}

TEST_F(SafetensorsDirTest, WriterRefusesInconsistentTensors) {
  const std::string path = Path("bad.safetensors");
  absl::Status s = WriteSafetensors(path, {{"w", DType::kF32, {2, 2}, std::vector<std::byte>(8)}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("'w'"));

  s = WriteSafetensors(path, {{"w", DType::kF32, {1}, std::vector<std::byte>(4)},
                              {"w", DType::kF32, {1}, std::vector<std::byte>(4)}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("duplicate"));

  s = WriteSafetensors(path, {{"w", DType::kF32, {-1}, {}}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);

  s = WriteSafetensors(path, {{"__metadata__", DType::kF32, {1}, std::vector<std::byte>(4)}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);

  s = WriteSafetensors(path, {{"w", DType::kF32, {int64_t{1} << 62, 4}, {}}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(fs::exists(path));
}

// --- Sharded folders -------------------------------------------------------------------------

class SafetensorsShardedTest : public SafetensorsDirTest {
 protected:
  void WriteShards() {
    ASSERT_TRUE(WriteSafetensors(Path("model-00001-of-00002.safetensors"),
                                 {{"a", DType::kF32, {2}, RandomBytes(8, 1)},
                                  {"b", DType::kBF16, {3}, RandomBytes(6, 2)}})
                    .ok());
    ASSERT_TRUE(WriteSafetensors(Path("model-00002-of-00002.safetensors"),
                                 {{"c", DType::kF16, {4, 2}, RandomBytes(16, 3)}})
                    .ok());
  }
  void WriteIndex(const std::string& a_shard, const std::string& b_shard,
                  const std::string& c_shard) {
    WriteText("model.safetensors.index.json",
              R"({"metadata": {"total_size": 30}, "weight_map": {"a": ")" + a_shard +
                  R"(", "b": ")" + b_shard + R"(", "c": ")" + c_shard + R"("}})");
  }
  static constexpr char kShard1[] = "model-00001-of-00002.safetensors";
  static constexpr char kShard2[] = "model-00002-of-00002.safetensors";
};

TEST_F(SafetensorsShardedTest, OpensEveryShard) {
  WriteShards();
  WriteIndex(kShard1, kShard1, kShard2);
  absl::StatusOr<std::unique_ptr<WeightSet>> set = WeightSet::OpenDir(dir_.string());
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ((*set)->total_bytes(), 30u);
  absl::StatusOr<const TensorView*> c = (*set)->Require("c", {4, 2});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ((*c)->dtype, DType::kF16);
  EXPECT_EQ(std::memcmp((*c)->data, RandomBytes(16, 3).data(), 16), 0);
  ASSERT_TRUE((*set)->Require("a", {2}).ok());
  ASSERT_TRUE((*set)->Require("b", {3}).ok());
}

TEST_F(SafetensorsShardedTest, MissingShardIsNotFound) {
  WriteShards();
  fs::remove(Path(kShard2));
  WriteIndex(kShard1, kShard1, kShard2);
  absl::StatusOr<std::unique_ptr<WeightSet>> set = WeightSet::OpenDir(dir_.string());
  EXPECT_EQ(set.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(set.status().message(), HasSubstr(kShard2));
}

TEST_F(SafetensorsShardedTest, TensorInTheWrongShardIsRefused) {
  WriteShards();
  WriteIndex(kShard1, kShard1, kShard1);  // c lives in shard 2
  absl::StatusOr<std::unique_ptr<WeightSet>> set = WeightSet::OpenDir(dir_.string());
  EXPECT_EQ(set.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(set.status().message(), AllOf(HasSubstr("'c'"), HasSubstr(kShard1)));
}

TEST_F(SafetensorsShardedTest, DuplicateTensorAcrossShardsIsRefused) {
  WriteShards();
  ASSERT_TRUE(WriteSafetensors(Path(kShard2), {{"c", DType::kF16, {4, 2}, RandomBytes(16, 3)},
                                               {"a", DType::kF32, {2}, RandomBytes(8, 1)}})
                  .ok());
  WriteIndex(kShard1, kShard1, kShard2);
  absl::StatusOr<std::unique_ptr<WeightSet>> set = WeightSet::OpenDir(dir_.string());
  EXPECT_EQ(set.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(set.status().message(), AllOf(HasSubstr("'a'"), HasSubstr("both")));
}

TEST_F(SafetensorsShardedTest, ShardNamesMustBePlainFileNames) {
  WriteShards();
  for (const std::string shard :
       {"../model-00001-of-00002.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ""}) {
    SCOPED_TRACE(shard);
    WriteIndex(kShard1, shard, kShard2);
    absl::StatusOr<std::unique_ptr<WeightSet>> set = WeightSet::OpenDir(dir_.string());
    EXPECT_EQ(set.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(set.status().message(), HasSubstr("plain file name"));
  }
}

TEST_F(SafetensorsShardedTest, MalformedIndexIsRefused) {
  WriteShards();
  for (const std::string text : {"{", "[]", R"({"weight_map": []})", R"({"weight_map": {}})",
                                 R"({"weight_map": {"a": 1}})", R"({"no_map": {}})"}) {
    SCOPED_TRACE(text);
    WriteText("model.safetensors.index.json", text);
    absl::StatusOr<std::unique_ptr<WeightSet>> set = WeightSet::OpenDir(dir_.string());
    EXPECT_EQ(set.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(set.status().message(), HasSubstr("model.safetensors.index.json"));
  }
}

TEST_F(SafetensorsDirTest, FolderWithoutWeightsIsNotFound) {
  WriteText("pytorch_model.bin", "x");
  absl::StatusOr<std::unique_ptr<WeightSet>> set = WeightSet::OpenDir(dir_.string());
  EXPECT_EQ(set.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(set.status().message(),
              AllOf(HasSubstr("model.safetensors"), HasSubstr("model.safetensors.index.json"),
                    HasSubstr(dir_.string())));

  set = WeightSet::OpenDir(Path("does_not_exist"));
  EXPECT_EQ(set.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(set.status().message(), HasSubstr("does_not_exist"));
}

TEST_F(SafetensorsDirTest, OpenReportsFileSystemErrors) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(Path("nope"));
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(file.status().message(), HasSubstr("nope"));

  file = SafetensorsFile::Open(dir_.string());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);

  WriteText("short.safetensors", "abc");
  file = SafetensorsFile::Open(Path("short.safetensors"));
  EXPECT_EQ(file.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(file.status().message(), HasSubstr("short.safetensors"));

  WriteText("empty.safetensors", "");
  file = SafetensorsFile::Open(Path("empty.safetensors"));
  EXPECT_EQ(file.status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(SafetensorsDirTest, TruncatedFixtureIsDataLoss) {
  const std::string src = ModelDir("llama2_mha_f16") + "/model.safetensors";
  const std::string dst = Path("model.safetensors");
  fs::copy_file(src, dst);
  fs::resize_file(dst, fs::file_size(src) - 100);
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(dst);
  EXPECT_EQ(file.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(file.status().message(), AllOf(HasSubstr(dst), HasSubstr("tensor '")));

  fs::resize_file(dst, 1000);  // now the header itself runs past the end
  file = SafetensorsFile::Open(dst);
  EXPECT_EQ(file.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(file.status().message(), HasSubstr("header length"));
}

// --- Hostile headers -------------------------------------------------------------------------

void ExpectRefused(const std::string& image, absl::StatusCode code,
                   const std::vector<std::string>& needles) {
  const ParsedImage parsed(image);
  const absl::StatusOr<std::unique_ptr<SafetensorsFile>>& file = parsed.file;
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), code) << file.status();
  EXPECT_THAT(file.status().message(), HasSubstr("test.safetensors"));
  for (const std::string& needle : needles) {
    EXPECT_THAT(file.status().message(), HasSubstr(needle));
  }
}

TEST(SafetensorsHostileTest, ValidSmallImageParses) {
  const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"BF16","shape":[2,2],"data_offsets":[8,16]},)"
                             R"("z":{"dtype":"F16","shape":[0],"data_offsets":[8,8]},)"
                             R"("__metadata__":{"k":"v"}})";
  const ParsedImage parsed(MakeImage(header, 16));
  const absl::StatusOr<std::unique_ptr<SafetensorsFile>>& file = parsed.file;
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->tensors().size(), 3u);
  EXPECT_EQ((*file)->Find("b")->nbytes, 8u);
  EXPECT_EQ((*file)->Find("b")->data - (*file)->Find("a")->data, 8);
  EXPECT_EQ((*file)->Find("z")->nbytes, 0u);
  EXPECT_EQ((*file)->metadata().at("k"), "v");
}

TEST(SafetensorsHostileTest, TruncatedFile) {
  ExpectRefused("", absl::StatusCode::kDataLoss, {"8-byte"});
  ExpectRefused(std::string(7, '\0'), absl::StatusCode::kDataLoss, {"8-byte"});
  ExpectRefused(MakeImage("{}", 0, 1000), absl::StatusCode::kDataLoss,
                {"header length 1000", "past the end"});
  ExpectRefused(MakeImage("{}", 0, ~uint64_t{0}), absl::StatusCode::kInvalidArgument, {"limit"});
}

TEST(SafetensorsHostileTest, HeaderOverLimit) {
  ExpectRefused(MakeImage("{}", 0, 100'000'001), absl::StatusCode::kInvalidArgument,
                {"100000001", "limit"});
}

TEST(SafetensorsHostileTest, OffsetsOutOfRange) {
  ExpectRefused(MakeImage(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8),
                absl::StatusCode::kDataLoss, {"tensor 'w'", "data section"});
  ExpectRefused(MakeImage(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[18446744073709551600,)"
                          R"(18446744073709551615]}})",
                          16),
                absl::StatusCode::kInvalidArgument, {"tensor 'w'"});
}

TEST(SafetensorsHostileTest, BeginAfterEnd) {
  ExpectRefused(MakeImage(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", 16),
                absl::StatusCode::kInvalidArgument, {"tensor 'w'", "begin > end"});
}

TEST(SafetensorsHostileTest, OverflowingShape) {
  ExpectRefused(
      MakeImage(R"({"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,16]}})",
                16),
      absl::StatusCode::kInvalidArgument, {"tensor 'w'", "overflow"});
  // A zero dimension does not hide an overflow of the others.
  ExpectRefused(MakeImage(R"({"w":{"dtype":"BF16","shape":[0,4294967296,4294967296],)"
                          R"("data_offsets":[0,0]}})",
                          0),
                absl::StatusCode::kInvalidArgument, {"tensor 'w'", "overflow"});
  ExpectRefused(
      MakeImage(R"({"w":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]}})", 4),
      absl::StatusCode::kInvalidArgument, {"tensor 'w'", "shape[0]"});
}

TEST(SafetensorsHostileTest, BadShapeValues) {
  for (const std::string shape : {"[-1]", "[1.5]", R"(["4"])", "4", "null", "[true]", "[[1]]"}) {
    SCOPED_TRACE(shape);
    ExpectRefused(
        MakeImage(R"({"w":{"dtype":"F32","shape":)" + shape + R"(,"data_offsets":[0,4]}})", 4),
        absl::StatusCode::kInvalidArgument, {"tensor 'w'", "shape"});
  }
  std::string rank64 = "[1";
  for (int i = 1; i < 64; ++i) {
    rank64 += ",1";
  }
  rank64 += "]";
  ExpectRefused(
      MakeImage(R"({"w":{"dtype":"F32","shape":)" + rank64 + R"(,"data_offsets":[0,4]}})", 4),
      absl::StatusCode::kInvalidArgument, {"tensor 'w'", "dimensions"});
}

TEST(SafetensorsHostileTest, BadOffsetValues) {
  for (const std::string offsets : {"[0]", "[0,4,8]", "[-4,4]", "[0,4.0]", R"(["0","4"])", "{}"}) {
    SCOPED_TRACE(offsets);
    ExpectRefused(
        MakeImage(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":)" + offsets + "}}", 8),
        absl::StatusCode::kInvalidArgument, {"tensor 'w'", "data_offsets"});
  }
}

TEST(SafetensorsHostileTest, NumelMismatch) {
  ExpectRefused(MakeImage(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", 16),
                absl::StatusCode::kInvalidArgument, {"tensor 'w'", "needs 12 bytes"});
  ExpectRefused(MakeImage(R"({"w":{"dtype":"BF16","shape":[4],"data_offsets":[0,16]}})", 16),
                absl::StatusCode::kInvalidArgument, {"tensor 'w'", "needs 8 bytes"});
}

TEST(SafetensorsHostileTest, OverlappingTensors) {
  ExpectRefused(MakeImage(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                          R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
                          24),
                absl::StatusCode::kInvalidArgument, {"tensor 'b'", "overlap", "'a'"});
  // Identical extents and a tensor nested inside another.
  ExpectRefused(MakeImage(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                          R"("b":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
                          16),
                absl::StatusCode::kInvalidArgument, {"overlap"});
  ExpectRefused(MakeImage(R"({"a":{"dtype":"F32","shape":[8],"data_offsets":[0,32]},)"
                          R"("b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]},)"
                          R"("c":{"dtype":"F32","shape":[1],"data_offsets":[40,44]}})",
                          44),
                absl::StatusCode::kInvalidArgument, {"tensor 'b'", "overlap"});
}

TEST(SafetensorsHostileTest, UnsupportedDType) {
  for (const std::string dtype : {"I8", "F64", "BOOL", "U8", "F8_E4M3", "f32", ""}) {
    SCOPED_TRACE(dtype);
    ExpectRefused(
        MakeImage(R"({"w":{"dtype":")" + dtype + R"(","shape":[8],"data_offsets":[0,8]}})", 8),
        absl::StatusCode::kInvalidArgument, {"tensor 'w'", "dtype '" + dtype + "'"});
  }
  ExpectRefused(MakeImage(R"({"w":{"dtype":4,"shape":[8],"data_offsets":[0,8]}})", 8),
                absl::StatusCode::kInvalidArgument, {"tensor 'w'", "dtype"});
}

TEST(SafetensorsHostileTest, NonObjectJson) {
  for (const std::string header : {"[1,2]", "42", "\"x\"", "null"}) {
    SCOPED_TRACE(header);
    ExpectRefused(MakeImage(header, 0), absl::StatusCode::kInvalidArgument, {"object"});
  }
  ExpectRefused(MakeImage(R"({"w":[1,2]})", 0), absl::StatusCode::kInvalidArgument,
                {"tensor 'w'", "not a JSON object"});
  ExpectRefused(MakeImage(R"({"__metadata__":{"k":1}})", 0), absl::StatusCode::kInvalidArgument,
                {"__metadata__", "'k'"});
  ExpectRefused(MakeImage(R"({"__metadata__":[]})", 0), absl::StatusCode::kInvalidArgument,
                {"__metadata__"});
}

TEST(SafetensorsHostileTest, MalformedJson) {
  for (const std::string& header : std::vector<std::string>{
           "", "{", R"({"w": )", "{'a': 1}", "{\"a\":1,}", "\xff\xfe", std::string("{\0}", 3)}) {
    SCOPED_TRACE(header);
    ExpectRefused(MakeImage(header, 0), absl::StatusCode::kInvalidArgument, {"malformed JSON"});
  }
  // Deep nesting must not exhaust the stack.
  ExpectRefused(MakeImage(std::string(1'000'000, '['), 0), absl::StatusCode::kInvalidArgument,
                {"malformed JSON"});
  ExpectRefused(MakeImage(std::string(200'000, '[') + std::string(200'000, ']'), 0),
                absl::StatusCode::kInvalidArgument, {"object"});
}

TEST(SafetensorsHostileTest, HostileNamesAreEscapedAndBounded) {
  // The JSON name decodes to "evil\n\x1b[31m" followed by 10k 'x'.
  const ParsedImage parsed(MakeImage(R"({"evil\n\u001b[31m)" + std::string(10'000, 'x') +
                                         R"(":{"dtype":"I8","shape":[1],"data_offsets":[0,1]}})",
                                     1));
  const absl::StatusOr<std::unique_ptr<SafetensorsFile>>& file = parsed.file;
  ASSERT_FALSE(file.ok());
  EXPECT_THAT(file.status().message(), HasSubstr("evil\\n\\x1b[31m"));
  EXPECT_LT(file.status().message().size(), 1000u);
}

}  // namespace
}  // namespace tandem
