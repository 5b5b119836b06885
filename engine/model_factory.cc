// Deterministic random model folders in Hugging Face layout.
#include "engine/model_factory.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "engine/internal/thread_pool.h"
#include "engine/safetensors.h"
#include "engine/sampling.h"

namespace tandem {
namespace {

using json = nlohmann::json;

const char* ModelType(const std::string& arch) {
  if (arch == "MistralForCausalLM") return "mistral";
  if (arch == "Qwen2ForCausalLM") return "qwen2";
  if (arch == "Qwen3ForCausalLM") return "qwen3";
  return "llama";
}

// GPT-2's byte -> printable code point map used by byte-level BPE vocabularies.
std::string ByteToken(int b) {
  int cp = b;
  if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255))) {
    int n = 0;
    for (int x = 0; x < b; ++x) {
      if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255))) ++n;
    }
    cp = 256 + n;
  }
  std::string out;
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return out;
}

absl::Status WriteText(const std::filesystem::path& p, const std::string& text) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f << text;
  f.close();
  if (!f) {
    return absl::InternalError(absl::StrCat("cannot write ", p.string()));
  }
  return absl::OkStatus();
}

// Collects the tensors of a model and fills them with values uniform in
// [center - spread, center + spread]. Element i of the k-th tensor made comes from a generator
// seeded by (seed, k, i / kChunk), so the values depend on the seed and the tensor list only,
// never on how many threads fill them.
class TensorMaker {
 public:
  TensorMaker(DType dtype, uint64_t seed) : dtype_(dtype), seed_(seed) {}

  void Make(std::string name, std::vector<int64_t> shape, float center, float spread) {
    Pending p;
    p.tensor.name = std::move(name);
    p.tensor.dtype = dtype_;
    p.tensor.shape = std::move(shape);
    p.center = center;
    p.spread = spread;
    pending_.push_back(std::move(p));
  }

  // Allocates and fills every tensor, on all hardware threads unless the model is tiny (a
  // Llama-3-8B is 8e9 values).
  std::vector<TensorToWrite> Fill() {
    int64_t total = 0;
    for (const Pending& p : pending_) total += Elements(p);
    internal::ThreadPool pool(total < 64 * kChunk ? 1 : 0);
    const size_t esize = DTypeSize(dtype_);
    // Allocation first-touches the pages: spread that over the threads too.
    pool.ParallelFor(static_cast<int64_t>(pending_.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        pending_[k].tensor.data.resize(static_cast<size_t>(Elements(pending_[k])) * esize);
      }
    });
    std::vector<std::pair<int32_t, int64_t>> chunks;  // (tensor, chunk index)
    for (size_t k = 0; k < pending_.size(); ++k) {
      const int64_t n = Elements(pending_[k]);
      for (int64_t c = 0; c * kChunk < n; ++c) chunks.emplace_back(static_cast<int32_t>(k), c);
    }
    pool.ParallelFor(static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
      std::vector<float> buf(kChunk);
      for (int64_t i = b; i < e; ++i) {
        const auto [k, c] = chunks[i];
        Pending& p = pending_[k];
        const int64_t off = c * kChunk;
        const int64_t m = std::min(kChunk, Elements(p) - off);
        Rng rng(Mix(Mix(seed_ ^ Mix(static_cast<uint64_t>(k))) ^ static_cast<uint64_t>(c)));
        for (int64_t j = 0; j < m; ++j) {
          buf[j] = p.center + p.spread * static_cast<float>(2.0 * rng.Uniform() - 1.0);
        }
        ConvertElements(DType::kF32, buf.data(), dtype_, p.tensor.data.data() + off * esize, m);
      }
    });
    std::vector<TensorToWrite> out;
    out.reserve(pending_.size());
    for (Pending& p : pending_) out.push_back(std::move(p.tensor));
    pending_.clear();
    return out;
  }

 private:
  static constexpr int64_t kChunk = int64_t{1} << 18;

  struct Pending {
    TensorToWrite tensor;
    float center = 0;
    float spread = 0;
  };

  static int64_t Elements(const Pending& p) {
    int64_t n = 1;
    for (int64_t d : p.tensor.shape) n *= d;
    return n;
  }

  // SplitMix64's finaliser: neighbouring inputs give unrelated seeds.
  static uint64_t Mix(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
  }

  DType dtype_;
  uint64_t seed_;
  std::vector<Pending> pending_;
};

}  // namespace

absl::StatusOr<RandomModelSpec> RandomModelPreset(const std::string& name) {
  struct Preset {
    const char* name;
    const char* architecture;
    int32_t vocab, hidden, intermediate, layers, heads, kv_heads;
    int64_t max_positions;
    float rope_theta;
    bool tied;
  };
  // Shapes of the published models of these names (weights are random).
  static constexpr Preset kPresets[] = {
      {"demo", "LlamaForCausalLM", 512, 128, 344, 2, 4, 2, 2048, 500000.0f, true},
      {"qwen2.5-0.5b", "Qwen2ForCausalLM", 151936, 896, 4864, 24, 14, 2, 32768, 1000000.0f, true},
      {"llama-3.2-1b", "LlamaForCausalLM", 128256, 2048, 8192, 16, 32, 8, 131072, 500000.0f, true},
      {"llama-3-8b", "LlamaForCausalLM", 128256, 4096, 14336, 32, 32, 8, 8192, 500000.0f, false},
  };
  for (const Preset& p : kPresets) {
    if (name != p.name) continue;
    RandomModelSpec s;
    s.architecture = p.architecture;
    s.vocab_size = p.vocab;
    s.hidden_size = p.hidden;
    s.intermediate_size = p.intermediate;
    s.num_layers = p.layers;
    s.num_heads = p.heads;
    s.num_kv_heads = p.kv_heads;
    s.max_position_embeddings = p.max_positions;
    s.rope_theta = p.rope_theta;
    s.tie_word_embeddings = p.tied;
    return s;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown model preset '", name,
                   "' (expected demo, qwen2.5-0.5b, llama-3.2-1b or llama-3-8b)"));
}

absl::Status WriteRandomModel(const std::string& dir, const RandomModelSpec& spec) {
  namespace fs = std::filesystem;
  if (spec.write_tokenizer && spec.vocab_size < 258) {
    return absl::InvalidArgumentError("vocab_size must be >= 258 for the byte-level tokenizer");
  }
  if (spec.num_heads <= 0 || spec.num_kv_heads <= 0 || spec.num_heads % spec.num_kv_heads != 0) {
    return absl::InvalidArgumentError("num_kv_heads must divide num_heads");
  }
  const int32_t head_dim = spec.head_dim > 0 ? spec.head_dim : spec.hidden_size / spec.num_heads;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  }
  const int32_t bos = spec.write_tokenizer ? 256 : 1;
  const int32_t eos = spec.write_tokenizer ? 257 : 2;
  const bool qwen2 = spec.architecture == "Qwen2ForCausalLM";
  const bool qwen3 = spec.architecture == "Qwen3ForCausalLM";

  json config = {
      {"architectures", {spec.architecture}},
      {"model_type", ModelType(spec.architecture)},
      {"vocab_size", spec.vocab_size},
      {"hidden_size", spec.hidden_size},
      {"intermediate_size", spec.intermediate_size},
      {"num_hidden_layers", spec.num_layers},
      {"num_attention_heads", spec.num_heads},
      {"num_key_value_heads", spec.num_kv_heads},
      {"head_dim", head_dim},
      {"hidden_act", "silu"},
      {"max_position_embeddings", spec.max_position_embeddings},
      {"rms_norm_eps", 1e-5},
      {"rope_theta", spec.rope_theta},
      {"rope_scaling", nullptr},
      {"tie_word_embeddings", spec.tie_word_embeddings},
      {"bos_token_id", bos},
      {"eos_token_id", eos},
      {"torch_dtype", spec.dtype == DType::kBF16   ? "bfloat16"
                      : spec.dtype == DType::kF16 ? "float16"
                                                   : "float32"},
  };
  if (absl::Status s = WriteText(fs::path(dir) / "config.json", config.dump(2)); !s.ok()) return s;
  json gen = {{"bos_token_id", bos}, {"eos_token_id", eos}, {"do_sample", true},
              {"temperature", 0.8}, {"top_p", 0.95}};
  if (absl::Status s = WriteText(fs::path(dir) / "generation_config.json", gen.dump(2)); !s.ok()) {
    return s;
  }

  TensorMaker mk(spec.dtype, spec.seed);
  const int64_t H = spec.hidden_size;
  const int64_t q_dim = static_cast<int64_t>(spec.num_heads) * head_dim;
  const int64_t kv_dim = static_cast<int64_t>(spec.num_kv_heads) * head_dim;
  const int64_t I = spec.intermediate_size;
  // Scales keep activations O(1) through the layers: uniform(+-a) has std a / sqrt(3).
  const float w_h = std::sqrt(3.0f / static_cast<float>(H));
  const float w_q = std::sqrt(3.0f / static_cast<float>(q_dim));
  const float w_i = std::sqrt(3.0f / static_cast<float>(I));
  mk.Make("model.embed_tokens.weight", {spec.vocab_size, H}, 0.0f, 1.0f);
  mk.Make("model.norm.weight", {H}, 1.0f, 0.1f);
  if (!spec.tie_word_embeddings) {
    mk.Make("lm_head.weight", {spec.vocab_size, H}, 0.0f, w_h);
  }
  for (int32_t l = 0; l < spec.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    mk.Make(p + "input_layernorm.weight", {H}, 1.0f, 0.1f);
    mk.Make(p + "post_attention_layernorm.weight", {H}, 1.0f, 0.1f);
    mk.Make(p + "self_attn.q_proj.weight", {q_dim, H}, 0.0f, w_h);
    mk.Make(p + "self_attn.k_proj.weight", {kv_dim, H}, 0.0f, w_h);
    mk.Make(p + "self_attn.v_proj.weight", {kv_dim, H}, 0.0f, w_h);
    mk.Make(p + "self_attn.o_proj.weight", {H, q_dim}, 0.0f, w_q);
    if (qwen2) {
      mk.Make(p + "self_attn.q_proj.bias", {q_dim}, 0.0f, 0.1f);
      mk.Make(p + "self_attn.k_proj.bias", {kv_dim}, 0.0f, 0.1f);
      mk.Make(p + "self_attn.v_proj.bias", {kv_dim}, 0.0f, 0.1f);
    }
    if (qwen3) {
      mk.Make(p + "self_attn.q_norm.weight", {head_dim}, 1.0f, 0.1f);
      mk.Make(p + "self_attn.k_norm.weight", {head_dim}, 1.0f, 0.1f);
    }
    mk.Make(p + "mlp.gate_proj.weight", {I, H}, 0.0f, w_h);
    mk.Make(p + "mlp.up_proj.weight", {I, H}, 0.0f, w_h);
    mk.Make(p + "mlp.down_proj.weight", {H, I}, 0.0f, w_i);
  }
  const std::vector<TensorToWrite> t = mk.Fill();
  if (absl::Status s = WriteSafetensors((fs::path(dir) / "model.safetensors").string(), t,
                                        {{"format", "pt"}});
      !s.ok()) {
    return s;
  }
  if (!spec.write_tokenizer) {
    return absl::OkStatus();
  }

  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[ByteToken(b)] = b;
  auto added = [](int id, const char* content) {
    return json{{"id", id},         {"content", content}, {"single_word", false},
                {"lstrip", false},  {"rstrip", false},    {"normalized", false},
                {"special", true}};
  };
  const char* kSplit =
      "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
      "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
  json tok = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", {added(256, "<|begin_of_text|>"), added(257, "<|end_of_text|>")}},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"},
           {"pattern", {{"Regex", kSplit}}},
           {"behavior", "Isolated"},
           {"invert", false}},
          {{"type", "ByteLevel"},
           {"add_prefix_space", false},
           {"trim_offsets", true},
           {"use_regex", false}}}}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single",
         {{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
          {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"pair",
         {{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
          {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
          {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
        {"special_tokens",
         {{"<|begin_of_text|>", {{"id", "<|begin_of_text|>"}, {"ids", {256}},
                                 {"tokens", {"<|begin_of_text|>"}}}}}}}},
      {"decoder",
       {{"type", "ByteLevel"},
        {"add_prefix_space", true},
        {"trim_offsets", true},
        {"use_regex", true}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"ignore_merges", false},
        {"vocab", vocab},
        {"merges", json::array()}}},
  };
  if (absl::Status s = WriteText(fs::path(dir) / "tokenizer.json", tok.dump(1)); !s.ok()) return s;
  json tok_cfg = {{"bos_token", "<|begin_of_text|>"},
                  {"eos_token", "<|end_of_text|>"},
                  {"clean_up_tokenization_spaces", false},
                  {"model_max_length", spec.max_position_embeddings},
                  {"tokenizer_class", "PreTrainedTokenizerFast"}};
  return WriteText(fs::path(dir) / "tokenizer_config.json", tok_cfg.dump(2));
}

}  // namespace tandem
