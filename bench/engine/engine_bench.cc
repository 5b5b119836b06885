// CPU engine benchmark: prefill and decode tokens/s on a random-weight model of a real shape
// (default Qwen2.5-0.5B), next to the machine's memory-bandwidth roofline measured in the same
// run. Usage: engine_bench [--preset qwen2.5-0.5b] [--dir DIR] [--threads N] [--json]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "engine/internal/thread_pool.h"
#include "engine/model_factory.h"

namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Read bandwidth (GB/s): every thread sums its slice of a buffer much larger than the caches.
double MeasureReadBandwidth(int threads) {
  const size_t bytes = size_t{1} << 30;
  std::vector<float> buf(bytes / sizeof(float), 1.0f);
  tandem::internal::ThreadPool pool(threads);
  const int64_t n = static_cast<int64_t>(buf.size());
  const int64_t slices = 256;
  std::vector<double> partial(slices);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = Clock::now();
    pool.ParallelFor(slices, 1, [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e; ++s) {
        const float* p = buf.data() + s * (n / slices);
        typedef float v8f __attribute__((vector_size(32)));
        v8f a0{}, a1{}, a2{}, a3{};
        const int64_t m = n / slices;
        for (int64_t i = 0; i + 32 <= m; i += 32) {
          v8f x0, x1, x2, x3;
          std::memcpy(&x0, p + i, 32);
          std::memcpy(&x1, p + i + 8, 32);
          std::memcpy(&x2, p + i + 16, 32);
          std::memcpy(&x3, p + i + 24, 32);
          a0 += x0;
          a1 += x1;
          a2 += x2;
          a3 += x3;
        }
        v8f a = a0 + a1 + a2 + a3;
        double sum = 0;
        for (int k = 0; k < 8; ++k) sum += a[k];
        partial[s] = sum;
      }
    });
    const double sec = Seconds(t0, Clock::now());
    best = std::max(best, bytes / sec / 1e9);
  }
  return best;
}

struct Args {
  std::string preset = "qwen2.5-0.5b";
  std::string dir;
  int threads = 0;
  int prompt_len = 512;
  int decode_tokens = 32;
  bool json = false;
};

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (k == "--preset") a.preset = next();
    else if (k == "--dir") a.dir = next();
    else if (k == "--threads") a.threads = std::stoi(next());
    else if (k == "--prompt-len") a.prompt_len = std::stoi(next());
    else if (k == "--decode-tokens") a.decode_tokens = std::stoi(next());
    else if (k == "--json") a.json = true;
    else {
      std::fprintf(stderr, "usage: engine_bench [--preset P] [--dir D] [--threads N] "
                           "[--prompt-len N] [--decode-tokens N] [--json]\n");
      return 2;
    }
  }
  namespace fs = std::filesystem;
  if (a.dir.empty()) {
    a.dir = (fs::temp_directory_path() / ("tandem-bench-" + a.preset)).string();
  }
  if (!fs::exists(fs::path(a.dir) / "model.safetensors")) {
    auto spec = tandem::RandomModelPreset(a.preset);
    if (!spec.ok()) {
      std::fprintf(stderr, "%s\n", std::string(spec.status().message()).c_str());
      return 2;
    }
    spec->write_tokenizer = false;
    std::fprintf(stderr, "writing random %s model to %s ...\n", a.preset.c_str(), a.dir.c_str());
    if (auto s = tandem::WriteRandomModel(a.dir, *spec); !s.ok()) {
      std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
      return 1;
    }
  }

  const double bw = MeasureReadBandwidth(a.threads);

  tandem::EngineOptions o;
  o.model_dir = a.dir;
  o.num_threads = a.threads;
  o.max_batch_tokens = 4096;
  o.kv_cache_bytes = int64_t{2} << 30;
  o.enable_prefix_cache = false;
  auto engine = tandem::Engine::Create(o);
  if (!engine.ok()) {
    std::fprintf(stderr, "%s\n", std::string(engine.status().message()).c_str());
    return 1;
  }
  tandem::Engine& e = **engine;
  const tandem::ModelWeights& m = e.model();
  // Bytes of weights read per decode step: every matrix and norm once (the embedding gather is
  // negligible unless the LM head is tied to it, in which case it is read whole).
  double weight_bytes = 0;
  auto add = [&](const tandem::TensorView* t) {
    if (t) weight_bytes += static_cast<double>(t->nbytes);
  };
  add(m.lm_head);
  add(m.final_norm);
  for (const auto& L : m.layers) {
    for (auto* t : {L.attn_norm, L.wq, L.wk, L.wv, L.wo, L.bq, L.bk, L.bv, L.q_norm, L.k_norm,
                    L.mlp_norm, L.w_gate, L.w_up, L.w_down}) {
      add(t);
    }
  }
  const double roofline_tps = bw * 1e9 / weight_bytes;

  auto prompt = [&](int len, int salt) {
    std::vector<int32_t> p;
    for (int i = 0; i < len; ++i) p.push_back((i * 7919 + salt * 104729) % e.config().vocab_size);
    return p;
  };
  auto request = [&](int len, int salt, int max_tokens) {
    tandem::SequenceRequest r;
    r.prompt_ids = prompt(len, salt);
    r.sampling.temperature = 0.0f;
    r.sampling.ignore_eos = true;
    r.sampling.max_tokens = max_tokens;
    return r;
  };

  // Warm-up (page in the weights).
  (void)e.Generate(request(16, 99, 2));

  // Prefill: one prompt of prompt_len tokens, first token only.
  auto t0 = Clock::now();
  auto pre = e.Generate(request(a.prompt_len, 1, 1));
  const double prefill_s = Seconds(t0, Clock::now());
  if (!pre.ok()) {
    std::fprintf(stderr, "%s\n", std::string(pre.status().message()).c_str());
    return 1;
  }
  const double prefill_tps = a.prompt_len / prefill_s;

  // Decode at batch sizes 1 and 8: time only steps where every sequence decodes.
  std::map<int, double> decode_tps;
  for (int batch : {1, 8}) {
    std::vector<tandem::SeqId> ids;
    for (int b = 0; b < batch; ++b) {
      auto id = e.Add(request(32, b, a.decode_tokens + 1));
      if (!id.ok()) return 1;
    }
    auto first = e.Step();  // prefill of all
    if (!first.ok()) return 1;
    int64_t tokens = 0;
    const auto d0 = Clock::now();
    while (e.HasWork()) {
      auto ev = e.Step();
      if (!ev.ok()) return 1;
      tokens += static_cast<int64_t>(ev->size());
    }
    decode_tps[batch] = tokens / Seconds(d0, Clock::now());
  }

  nlohmann::json out = {
      {"preset", a.preset},
      {"threads", a.threads},
      {"weight_bytes_per_token", weight_bytes},
      {"read_bandwidth_gbps", bw},
      {"roofline_decode_tokens_per_s", roofline_tps},
      {"prefill_tokens", a.prompt_len},
      {"prefill_tokens_per_s", prefill_tps},
      {"decode_batch1_tokens_per_s", decode_tps[1]},
      {"decode_batch8_tokens_per_s", decode_tps[8]},
      {"decode_batch1_fraction_of_roofline", decode_tps[1] / roofline_tps},
  };
  if (a.json) {
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("model: %s (random weights, bf16), %.0f MB of weights read per decode step\n",
                a.preset.c_str(), weight_bytes / 1e6);
    std::printf("memory read bandwidth: %.2f GB/s -> roofline %.2f tok/s at batch 1\n", bw,
                roofline_tps);
    std::printf("prefill (%d tokens): %.1f tok/s\n", a.prompt_len, prefill_tps);
    std::printf("decode batch 1: %.2f tok/s (%.0f%% of roofline)\n", decode_tps[1],
                100 * decode_tps[1] / roofline_tps);
    std::printf("decode batch 8: %.2f tok/s\n", decode_tps[8]);
  }
  return 0;
}
