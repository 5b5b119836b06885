// Bounded mutation fuzzing of the two parsers that read untrusted model folders: the safetensors
// header and config.json. Fixed seeds keep failures reproducible; iteration counts keep each
// test to a few seconds under ASan. The property: never crash, never throw, never hand out a
// view outside the buffer; every refusal is an absl status with a message.
#include <cstdint>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/model_config.h"
#include "engine/safetensors.h"
#include "gtest/gtest.h"

namespace tandem {
namespace {

constexpr int kIterations = 3000;

std::string LittleEndian64(uint64_t v) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) {
    out[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  }
  return out;
}

// A valid image with every dtype, a scalar, an empty tensor and metadata; 40 data bytes.
std::string SeedImage() {
  const std::string header = R"({"__metadata__":{"format":"pt"},)"
                             R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
                             R"("b":{"dtype":"BF16","shape":[6],"data_offsets":[16,28]},)"
                             R"("c":{"dtype":"F16","shape":[],"data_offsets":[28,30]},)"
                             R"("d":{"dtype":"F16","shape":[0,3],"data_offsets":[30,30]},)"
                             R"("e":{"dtype":"BF16","shape":[5],"data_offsets":[30,40]}})";
  std::string image = LittleEndian64(header.size()) + header;
  for (int i = 0; i < 40; ++i) {
    image.push_back(static_cast<char>(i));
  }
  return image;
}

// One random edit of the kind that turns a valid header into a hostile one.
std::string Mutate(std::string image, std::mt19937_64& rng) {
  auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
  const size_t edits = 1 + pick(3);
  for (size_t e = 0; e < edits; ++e) {
    // Earlier edits may have changed the length field or the size: re-read both.
    uint64_t header_len = 0;
    for (int i = 7; i >= 0 && image.size() >= 8; --i) {
      header_len = (header_len << 8) | static_cast<uint8_t>(image[i]);
    }
    size_t header_end = 0;
    if (image.size() >= 8) {
      header_end = header_len > image.size() - 8 ? image.size() : 8 + header_len;
    }
    switch (pick(8)) {
      case 0: {  // a digit (shape or offset) replaced by another, or by a long run of digits
        std::vector<size_t> digits;
        for (size_t i = 8; i < header_end; ++i) {
          if (image[i] >= '0' && image[i] <= '9') {
            digits.push_back(i);
          }
        }
        if (!digits.empty()) {
          const size_t at = digits[pick(digits.size())];
          if (pick(4) == 0) {
            image.replace(at, 1, std::string(1 + pick(25), static_cast<char>('0' + pick(10))));
          } else {
            image[at] = static_cast<char>('0' + pick(10));
          }
        }
        break;
      }
      case 1: {  // the length field set to something near, or something wild
        const uint64_t choices[] = {header_len + 1,
                                    header_len - 1,
                                    header_len + pick(64),
                                    header_len / 2,
                                    100'000'001,
                                    rng(),
                                    0,
                                    image.size()};
        image.replace(0, 8, LittleEndian64(choices[pick(8)]));
        break;
      }
      case 2:  // a random byte anywhere in the header
        if (header_end > 8) {
          image[8 + pick(header_end - 8)] = static_cast<char>(rng() & 0xff);
        }
        break;
      case 3: {  // a structural character swapped in
        static constexpr char kStructural[] = "{}[]\",:-.e0 ";
        if (header_end > 8) {
          image[8 + pick(header_end - 8)] = kStructural[pick(sizeof(kStructural) - 1)];
        }
        break;
      }
      case 4:  // truncation
        image.resize(pick(image.size() + 1));
        break;
      case 5:  // a dtype renamed
        for (const char* from : {"F32", "BF16", "F16"}) {
          const size_t at = image.find(from);
          if (at != std::string::npos && pick(2) == 0) {
            const char* to[] = {"I8", "F64", "BOOL", "F16", "BF16", "F32", "U64"};
            image.replace(at, std::strlen(from), to[pick(7)]);
          }
        }
        break;
      case 6:  // a byte deleted from the header, length field left alone
        if (header_end > 8) {
          image.erase(8 + pick(header_end - 8), 1);
        }
        break;
      default:  // a negative or huge number spliced in
        if (header_end > 8) {
          const char* numbers[] = {"-1",
                                   "18446744073709551615",
                                   "9223372036854775808",
                                   "4611686018427387904",
                                   "1e308",
                                   "0.5",
                                   "null"};
          image.insert(8 + pick(header_end - 8), numbers[pick(7)]);
        }
        break;
    }
  }
  return image;
}

TEST(SafetensorsFuzzTest, MutatedHeadersNeverCrash) {
  std::mt19937_64 rng(0x7a9de3);
  const std::string seed = SeedImage();
  {
    std::vector<std::byte> bytes(seed.size());
    std::memcpy(bytes.data(), seed.data(), seed.size());
    ASSERT_TRUE(SafetensorsFile::FromBuffer(bytes.data(), bytes.size(), "seed").ok());
  }
  int accepted = 0;
  for (int iter = 0; iter < kIterations; ++iter) {
    const std::string image = Mutate(seed, rng);
    // Exact-size heap copy: any read past the end is an ASan report.
    std::vector<std::byte> bytes(image.size());
    if (!image.empty()) {
      std::memcpy(bytes.data(), image.data(), image.size());
    }
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
        SafetensorsFile::FromBuffer(bytes.data(), bytes.size(), "fuzz");
    if (!file.ok()) {
      ASSERT_TRUE(file.status().code() == absl::StatusCode::kInvalidArgument ||
                  file.status().code() == absl::StatusCode::kDataLoss)
          << "iteration " << iter << ": " << file.status();
      ASSERT_FALSE(file.status().message().empty());
      continue;
    }
    ++accepted;
    // Whatever was accepted must be self-consistent and inside the buffer.
    for (const auto& [name, view] : (*file)->tensors()) {
      ASSERT_EQ(view.nbytes, static_cast<size_t>(view.numel()) * DTypeSize(view.dtype))
          << "iteration " << iter << " tensor " << name;
      ASSERT_GE(view.data, bytes.data());
      ASSERT_LE(view.data + view.nbytes, bytes.data() + bytes.size());
      unsigned sum = 0;
      for (size_t i = 0; i < view.nbytes; ++i) {
        sum += static_cast<unsigned>(view.data[i]);
      }
      (void)sum;
    }
  }
  // The mutations must leave some images valid, or the test only exercises the first check.
  EXPECT_GT(accepted, kIterations / 50);
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string MutateText(std::string text, std::mt19937_64& rng) {
  auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
  const size_t edits = 1 + pick(3);
  for (size_t e = 0; e < edits && !text.empty(); ++e) {
    const size_t at = pick(text.size());
    switch (pick(6)) {
      case 0:
        text[at] = static_cast<char>(rng() & 0xff);
        break;
      case 1: {
        static constexpr char kStructural[] = "{}[]\",:-.e0123456789 ";
        text[at] = kStructural[pick(sizeof(kStructural) - 1)];
        break;
      }
      case 2:
        text.erase(at, 1 + pick(8));
        break;
      case 3: {
        const char* values[] = {"null", "-1",    "0",          "true", "\"gelu\"", "[]",
                                "{}",   "1e400", "2147483648", "3.5",  "\"yarn\"", "[1,2,3]"};
        text.insert(at, values[pick(12)]);
        break;
      }
      case 4:
        text.resize(at);
        break;
      default: {  // a value replaced: find the next ':' and overwrite what follows
        const size_t colon = text.find(':', at);
        if (colon != std::string::npos) {
          const size_t end = text.find_first_of(",}", colon);
          const char* values[] = {"null",
                                  "-7",
                                  "0",
                                  "false",
                                  "\"x\"",
                                  "[]",
                                  "{}",
                                  "99999999999",
                                  "0.0",
                                  "[2,3]",
                                  "{\"rope_type\":\"linear\",\"factor\":0}"};
          text.replace(colon + 1, (end == std::string::npos ? text.size() : end) - colon - 1,
                       values[pick(11)]);
        }
        break;
      }
    }
  }
  return text;
}

TEST(ModelConfigFuzzTest, MutatedConfigsNeverCrash) {
  std::vector<std::string> seeds;
  for (const char* name :
       {"llama3_gqa_bf16", "qwen2_tied_bias_bf16", "llama2_mha_f16", "mistral_gqa_headdim_f32"}) {
    seeds.push_back(
        ReadFile(std::string(TANDEM_TEST_DATA_DIR) + "/models/" + name + "/config.json"));
  }
  seeds.push_back(ReadFile(std::string(TANDEM_DEMO_MODEL_DIR) + "/config.json"));
  for (const std::string& s : seeds) {
    ASSERT_TRUE(ModelConfig::FromJson(s).ok());
  }

  std::mt19937_64 rng(0xc0ffee);
  int accepted = 0;
  for (int iter = 0; iter < kIterations; ++iter) {
    const std::string text = MutateText(seeds[iter % seeds.size()], rng);
    absl::StatusOr<ModelConfig> c = ModelConfig::FromJson(text);
    if (!c.ok()) {
      ASSERT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument)
          << "iteration " << iter << ": " << c.status();
      ASSERT_FALSE(c.status().message().empty());
      continue;
    }
    ++accepted;
    // Accepted configs satisfy the invariants the engine relies on.
    ASSERT_GT(c->vocab_size, 0) << text;
    ASSERT_GT(c->hidden_size, 0) << text;
    ASSERT_GT(c->num_layers, 0) << text;
    ASSERT_GT(c->num_kv_heads, 0) << text;
    ASSERT_EQ(c->num_heads % c->num_kv_heads, 0) << text;
    ASSERT_GT(c->head_dim, 0) << text;
    ASSERT_GT(c->rms_norm_eps, 0.0f) << text;
    ASSERT_GT(c->rope_theta, 0.0f) << text;
    for (int32_t id : c->eos_token_ids) {
      ASSERT_TRUE(id >= 0 && id < c->vocab_size) << text;
    }
    (void)c->Fingerprint();
  }
  EXPECT_GT(accepted, kIterations / 50);

  // generation_config.json goes through the same field readers.
  const std::string gen = ReadFile(std::string(TANDEM_DEMO_MODEL_DIR) + "/generation_config.json");
  for (int iter = 0; iter < kIterations / 3; ++iter) {
    absl::StatusOr<GenerationDefaults> g = GenerationDefaults::FromJson(MutateText(gen, rng));
    if (!g.ok()) {
      ASSERT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument) << g.status();
    }
  }
}

}  // namespace
}  // namespace tandem
