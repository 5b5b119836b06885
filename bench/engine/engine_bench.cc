// Engine benchmark (CPU or CUDA backend): decode tokens/s at several batch sizes, prefill
// tokens/s and MFU at several prompt lengths, on a random-weight model of a real shape, next to
// baselines measured in the same run (memory bandwidth -> the batch-1 decode roofline; on CUDA
// also a bf16 GEMM -> MFU). The figures line up with bench/gpu/torch_peer.py run on the same
// model folder.
//
// Usage: engine_bench [--backend cpu|cuda] [--preset P] [--model-dir D] [--batches 1,8,...]
//                     [--prefill 512,...] [--json] ...   (--help lists every flag)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/engine.h"
#include "engine/internal/thread_pool.h"
#include "engine/model_factory.h"
#if defined(TANDEM_HAVE_CUDA_BACKEND)
#include "engine/backends/cuda/cuda_backend.h"
#include "engine/backends/cuda/cuda_probe.h"
#endif

namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Host read bandwidth (GB/s): every thread sums its slice of a buffer much larger than the caches.
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

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

constexpr const char* kUsage =
    "usage: engine_bench [flags]\n"
    "  --backend cpu|cuda     compute backend (default cpu); cuda uses device 0\n"
    "                         (pick another with CUDA_VISIBLE_DEVICES)\n"
    "  --preset P             demo, qwen2.5-0.5b (default), llama-3.2-1b, llama-3-8b\n"
    "  --model-dir D, --dir D model folder; written with random weights of the preset if it\n"
    "                         holds no model.safetensors (default: $TMPDIR/tandem-bench-P)\n"
    "  --make-model-only      write the model folder (if missing) and exit\n"
    "  --threads N            cpu threads (default 0: one per hardware thread)\n"
    "  --batches LIST         decode batch sizes (default 1,8 on cpu; 1,8,32,128 on cuda)\n"
    "  --prefill LIST         prefill prompt lengths (default 512 on cpu; 512,2048,8192 on cuda)\n"
    "  --prompt-len N         same as --prefill N\n"
    "  --decode-steps N       timed decode steps per sequence (default 32 on cpu, 128 on cuda)\n"
    "  --decode-tokens N      same as --decode-steps N\n"
    "  --decode-prompt-len N  prompt length of the decode sequences (default 32)\n"
    "  --reps N               timed repetitions, median reported (default 1 on cpu, 3 on cuda)\n"
    "  --warmup-reps N        untimed repetitions first (default 0 on cpu, 1 on cuda)\n"
    "  --kv-cache-gib X       KV pool size (default: what the run needs)\n"
    "  --kv-dtype T           f32, bf16 or f16 (default f32 on cpu, bf16 on cuda)\n"
    "  --activations M        cuda, bf16/f16 weights: fast (bf16 compute, default, as the\n"
    "                         PyTorch peer) or exact (hi + lo pairs: ~fp32, 2x GEMM work)\n"
    "  --cuda-graphs          cuda: replay greedy decode steps as CUDA graphs\n"
    "  --export-kv            also time each prefill as a disaggregated one: its KV streamed\n"
    "                         layer by layer to a sink that takes it at once (the cost of the\n"
    "                         export itself, with no network in the way)\n"
    "  --peak-tflops X        peak for mfu_vs_peak (default 989 on cuda: H100 SXM dense bf16;\n"
    "                         none on cpu)\n"
    "  --gemm-n N             cuda GEMM baseline size (default 8192)\n"
    "  --copy-mib N           cuda copy baseline size (default 2048)\n"
    "  --json                 print one JSON object instead of the text summary\n";

struct Args {
  std::string backend = "cpu";
  std::string preset = "qwen2.5-0.5b";
  bool preset_given = false;
  std::string dir;
  bool make_model_only = false;
  int threads = 0;
  std::vector<int> batches;
  std::vector<int> prefill;
  int decode_steps = 0;
  int decode_prompt_len = 32;
  int reps = 0;
  int warmup_reps = -1;
  double kv_cache_gib = 0;
  std::string kv_dtype;
  std::string activations = "fast";
  bool cuda_graphs = false;
  bool export_kv = false;  // GPU: "fast" (bf16 compute, as the PyTorch peer) or "exact"
  std::optional<double> peak_tflops;
  int gemm_n = 8192;
  int copy_mib = 2048;
  bool json = false;
};

bool ParseIntList(const std::string& text, std::vector<int>& out) {
  out.clear();
  for (absl::string_view piece : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    int v = 0;
    if (!absl::SimpleAtoi(piece, &v) || v <= 0) {
      return false;
    }
    out.push_back(v);
  }
  return !out.empty();
}

// Returns false (after printing why) on a bad command line.
bool ParseArgs(int argc, char** argv, Args& a) {
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (k == "--json") {
      a.json = true;
      continue;
    }
    if (k == "--make-model-only") {
      a.make_model_only = true;
      continue;
    }
    if (k == "--export-kv") {
      a.export_kv = true;
      continue;
    }
    if (k == "--cuda-graphs") {
      a.cuda_graphs = true;
      continue;
    }
    if (k == "--help" || k == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "engine_bench: %s needs a value (or is unknown)\n%s", k.c_str(), kUsage);
      return false;
    }
    const std::string v = argv[++i];
    bool ok = true;
    if (k == "--backend") {
      a.backend = v;
      ok = v == "cpu" || v == "cuda";
    } else if (k == "--preset") {
      a.preset = v;
      a.preset_given = true;
    } else if (k == "--dir" || k == "--model-dir") {
      a.dir = v;
    } else if (k == "--threads") {
      ok = absl::SimpleAtoi(v, &a.threads) && a.threads >= 0;
    } else if (k == "--batches") {
      ok = ParseIntList(v, a.batches);
    } else if (k == "--prefill" || k == "--prompt-len") {
      ok = ParseIntList(v, a.prefill);
    } else if (k == "--decode-steps" || k == "--decode-tokens") {
      ok = absl::SimpleAtoi(v, &a.decode_steps) && a.decode_steps > 0;
    } else if (k == "--decode-prompt-len") {
      ok = absl::SimpleAtoi(v, &a.decode_prompt_len) && a.decode_prompt_len > 0;
    } else if (k == "--reps") {
      ok = absl::SimpleAtoi(v, &a.reps) && a.reps > 0;
    } else if (k == "--warmup-reps") {
      ok = absl::SimpleAtoi(v, &a.warmup_reps) && a.warmup_reps >= 0;
    } else if (k == "--kv-cache-gib") {
      ok = absl::SimpleAtod(v, &a.kv_cache_gib) && a.kv_cache_gib > 0;
    } else if (k == "--kv-dtype") {
      a.kv_dtype = v;
      ok = tandem::ParseDType(v).has_value();
    } else if (k == "--activations") {
      a.activations = v;
      ok = v == "fast" || v == "exact";
    } else if (k == "--peak-tflops") {
      double p = 0;
      ok = absl::SimpleAtod(v, &p) && p > 0;
      a.peak_tflops = p;
    } else if (k == "--gemm-n") {
      ok = absl::SimpleAtoi(v, &a.gemm_n) && a.gemm_n > 0;
    } else if (k == "--copy-mib") {
      ok = absl::SimpleAtoi(v, &a.copy_mib) && a.copy_mib > 0;
    } else {
      std::fprintf(stderr, "engine_bench: unknown flag %s\n%s", k.c_str(), kUsage);
      return false;
    }
    if (!ok) {
      std::fprintf(stderr, "engine_bench: bad value '%s' for %s\n%s", v.c_str(), k.c_str(), kUsage);
      return false;
    }
  }
  const bool cuda = a.backend == "cuda";
  // Defaults per backend: the GPU run matches bench/gpu/torch_peer.py's; the CPU run stays short.
  if (a.batches.empty()) {
    a.batches = cuda ? std::vector<int>{1, 8, 32, 128} : std::vector<int>{1, 8};
  }
  if (a.prefill.empty()) {
    a.prefill = cuda ? std::vector<int>{512, 2048, 8192} : std::vector<int>{512};
  }
  if (a.decode_steps == 0) {
    a.decode_steps = cuda ? 128 : 32;
  }
  if (a.reps == 0) {
    a.reps = cuda ? 3 : 1;
  }
  if (a.warmup_reps < 0) {
    a.warmup_reps = cuda ? 1 : 0;
  }
  if (a.kv_dtype.empty()) {
    a.kv_dtype = cuda ? "bf16" : "f32";
  }
  if (!a.peak_tflops && cuda) {
    a.peak_tflops = 989.0;  // H100 SXM dense bf16
  }
  return true;
}

void Log(const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); }

std::string Message(const absl::Status& s) { return std::string(s.message()); }

// What the decode and prefill runs need from the engine, and what they measure.
// warmup_reps untimed runs, then reps timed ones (seconds each); the first error ends it.
template <typename Once>
absl::StatusOr<std::vector<double>> Repeat(const Args& a, Once once) {
  std::vector<double> times;
  for (int r = 0; r < a.warmup_reps + a.reps; ++r) {
    absl::StatusOr<double> sec = once(r);
    if (!sec.ok()) {
      return sec.status();
    }
    if (r >= a.warmup_reps) {
      times.push_back(*sec);
    }
  }
  return times;
}

// Takes every slice at once and lets it go (an infinitely fast network): what a prefill loses
// to exporting its KV is then the export's own cost.
class SinkTransfer final : public tandem::OutgoingTransfer {
 public:
  absl::Status SendLayer(tandem::LayerSlice slice) override {
    bytes_ += 2 * slice.token_count * token_bytes_;
    return absl::OkStatus();
  }
  absl::Status Finish(int32_t, float) override { return absl::OkStatus(); }
  void Abort(tandem::TransferError, std::string_view) override {}
  uint64_t transfer_id() const override { return 1; }
  int64_t token_count() const override { return 0; }

  void Reset(int64_t token_bytes) {
    token_bytes_ = token_bytes;
    bytes_ = 0;
  }
  int64_t bytes() const { return bytes_; }

 private:
  int64_t token_bytes_ = 0;
  int64_t bytes_ = 0;
};

class Runner {
 public:
  Runner(tandem::Engine& e, const Args& a) : e_(e), a_(a) {}

  tandem::SequenceRequest Request(int len, int salt, int max_tokens) const {
    tandem::SequenceRequest r;
    const int vocab = e_.config().vocab_size;
    for (int i = 0; i < len; ++i) {
      r.prompt_ids.push_back(
          static_cast<int32_t>((int64_t{i} * 7919 + int64_t{salt} * 104729) % vocab));
    }
    r.sampling.temperature = 0.0f;
    r.sampling.ignore_eos = true;
    r.sampling.max_tokens = max_tokens;
    return r;
  }

  // One run of `batch` sequences: their prefill and one decode step untimed, then
  // `decode_steps` steps in which every sequence decodes, timed. Returns those seconds.
  absl::StatusOr<double> DecodeOnce(int batch, int salt) {
    live_.clear();
    for (int b = 0; b < batch; ++b) {
      auto id = e_.Add(Request(a_.decode_prompt_len, salt + b, a_.decode_steps + 2));
      if (!id.ok()) {
        return Fail(id.status());
      }
      live_.push_back(*id);
    }
    // Untimed until every sequence has its first token (prefill; one step when
    // max_batch_tokens covers all prompts), then one all-decode step.
    std::map<tandem::SeqId, int> got;
    for (int want = 1; want <= 2; ++want) {
      for (int s = 0; static_cast<int>(got.size()) < batch ||
                      std::any_of(got.begin(), got.end(), [&](auto& g) { return g.second < want; });
           ++s) {
        auto ev = Step();
        if (!ev.ok()) {
          return Fail(ev.status());
        }
        if (s > kMaxSteps || !e_.HasWork()) {
          return Fail(absl::InternalError("the decode batch stopped before its timed steps"));
        }
        for (const tandem::TokenEvent& t : *ev) ++got[t.seq];
      }
    }
    if (std::any_of(got.begin(), got.end(), [](auto& g) { return g.second != 2; })) {
      return Fail(absl::InternalError(
          "the sequences of the decode batch are not in step (KV cache too small?)"));
    }
    int64_t tokens = 0;
    const auto t0 = Clock::now();
    for (int s = 0; s < a_.decode_steps; ++s) {
      tandem::StepStats st;
      auto ev = Step(&st);
      if (!ev.ok()) {
        return Fail(ev.status());
      }
      if (st.decode_tokens != batch || st.prefill_tokens != 0 || st.preempted != 0) {
        return Fail(absl::InternalError(absl::StrCat(
            "decode step ", s, " ran ", st.decode_tokens, " decodes, ", st.prefill_tokens,
            " prefill tokens, ", st.preempted, " preemptions; want ", batch,
            " decodes only (is the KV cache large enough?)")));
      }
      tokens += static_cast<int64_t>(ev->size());
    }
    const double sec = Seconds(t0, Clock::now());
    if (tokens != int64_t{batch} * a_.decode_steps || e_.HasWork()) {
      return Fail(absl::InternalError(absl::StrCat("decode produced ", tokens, " tokens, want ",
                                                   int64_t{batch} * a_.decode_steps)));
    }
    return sec;
  }

  // One prompt of `len` tokens: seconds of the Step() calls until its first token. With
  // `sink`, as a prefill-only sequence whose KV goes to it layer by layer.
  absl::StatusOr<double> PrefillOnce(int len, int salt,
                                     tandem::OutgoingTransfer* sink = nullptr) {
    live_.clear();
    tandem::SequenceRequest request = Request(len, salt, 1);
    request.prefill_only = sink != nullptr;
    request.kv_export = sink;
    auto id = e_.Add(std::move(request));
    if (!id.ok()) {
      return Fail(id.status());
    }
    live_.push_back(*id);
    const auto t0 = Clock::now();
    for (bool done = false; !done;) {
      auto ev = Step();
      if (!ev.ok()) {
        return Fail(ev.status());
      }
      for (const tandem::TokenEvent& t : *ev) done = done || t.seq == *id;
      if (!done && !e_.HasWork()) {
        return Fail(absl::InternalError("the prefill sequence left without a token"));
      }
    }
    const double sec = Seconds(t0, Clock::now());
    if (e_.HasWork()) {
      return Fail(absl::InternalError("the prefill sequence did not finish after one token"));
    }
    return sec;
  }

 private:
  // Bound on the untimed steps of one run: a scheduler that stops making progress fails the
  // run instead of hanging it.
  static constexpr int kMaxSteps = 100000;

  absl::StatusOr<std::vector<tandem::TokenEvent>> Step(tandem::StepStats* st = nullptr) {
    auto ev = e_.Step(st);
    if (ev.ok()) {
      for (const tandem::TokenEvent& t : *ev) {
        if (!t.status.ok()) {
          return t.status;
        }
      }
    }
    return ev;
  }

  // Drops the run's sequences so that the next configuration starts from an empty engine.
  absl::Status Fail(absl::Status s) {
    for (tandem::SeqId id : live_) e_.Abort(id);
    live_.clear();
    return s;
  }

  tandem::Engine& e_;
  const Args& a_;
  std::vector<tandem::SeqId> live_;  // sequences of the run in progress
};

}  // namespace

int main(int argc, char** argv) {
  Args a;
  if (!ParseArgs(argc, argv, a)) {
    return 2;
  }
  const bool cuda = a.backend == "cuda";
  namespace fs = std::filesystem;
  const bool dir_from_preset = a.dir.empty();
  if (dir_from_preset) {
    a.dir = (fs::temp_directory_path() / ("tandem-bench-" + a.preset)).string();
  }

  // The device first: without one there is no point writing a model.
  json gpu = nullptr;
  if (cuda && !a.make_model_only) {
#if defined(TANDEM_HAVE_CUDA_BACKEND)
    auto info = tandem::CudaDescribeDevice(0);
    if (!info.ok()) {
      std::fprintf(stderr, "engine_bench: --backend cuda: %s\n", Message(info.status()).c_str());
      return 1;
    }
    gpu = {{"name", info->name},
           {"compute_capability", absl::StrCat(info->compute_capability_major, ".",
                                               info->compute_capability_minor)},
           {"sm_count", info->sm_count},
           {"total_memory_bytes", info->total_memory_bytes},
           {"theoretical_bandwidth_gbps", info->theoretical_bandwidth_gbps},
           {"driver_version", info->driver_version},
           {"runtime_version", info->runtime_version}};
#else
    std::fprintf(stderr,
                 "engine_bench: --backend cuda: this build has no CUDA backend (configure with "
                 "nvcc present and -DTANDEM_CUDA=ON)\n");
    return 2;
#endif
  }

  json model_write_seconds = nullptr;
  if (!fs::exists(fs::path(a.dir) / "model.safetensors")) {
    auto spec = tandem::RandomModelPreset(a.preset);
    if (!spec.ok()) {
      std::fprintf(stderr, "engine_bench: %s\n", Message(spec.status()).c_str());
      return 2;
    }
    spec->write_tokenizer = false;
    Log(absl::StrCat("writing random ", a.preset, " model to ", a.dir, " ..."));
    const auto t0 = Clock::now();
    if (auto s = tandem::WriteRandomModel(a.dir, *spec); !s.ok()) {
      std::fprintf(stderr, "engine_bench: %s\n", Message(s).c_str());
      return 1;
    }
    model_write_seconds = Seconds(t0, Clock::now());
    Log(absl::StrCat("  written in ", model_write_seconds.get<double>(), " s"));
  } else {
    Log(absl::StrCat("using the model in ", a.dir));
  }
  // The preset names the model only if this run wrote it, the folder is the preset's default or
  // the caller named it.
  const json preset = model_write_seconds.is_number() || dir_from_preset || a.preset_given
                          ? json(a.preset)
                          : json();
  if (a.make_model_only) {
    return 0;
  }

  // Baselines on an otherwise idle machine, before the engine loads anything.
  double bw = 0;  // the roofline's read bandwidth, GB/s
  json device_copy_gbps = nullptr;
  json gemm_tflops = nullptr;
  json errors = json::object();
  if (cuda) {
#if defined(TANDEM_HAVE_CUDA_BACKEND)
    Log(absl::StrCat("baselines: device copy ", a.copy_mib, " MiB, bf16 GEMM ", a.gemm_n,
                     "^3 ..."));
    auto copy = tandem::CudaMeasureCopyBandwidthGBps(0, static_cast<size_t>(a.copy_mib) << 20);
    if (copy.ok()) {
      // The roofline takes the copy's whole memory traffic (each byte read once and written
      // once): that is what HBM sustains, and a weight-reading decode can approach it. Taking
      // the copied bytes alone would halve the roofline and flatter the fraction.
      bw = 2 * *copy;
      device_copy_gbps = *copy;
    } else {
      errors["copy_baseline"] = Message(copy.status());
    }
    auto gemm = tandem::CudaMeasureGemmTflops(0, a.gemm_n);
    if (gemm.ok()) {
      gemm_tflops = *gemm;
    } else {
      errors["gemm_baseline"] = Message(gemm.status());
    }
#endif
  } else {
    bw = MeasureReadBandwidth(a.threads);
  }

  // The model's shape, read from its config before the engine sizes its KV pool by it.
  auto cfg = tandem::ModelConfig::FromFile((fs::path(a.dir) / "config.json").string());
  if (!cfg.ok()) {
    std::fprintf(stderr, "engine_bench: %s\n", Message(cfg.status()).c_str());
    return 1;
  }
  const tandem::DType kv_dtype = *tandem::ParseDType(a.kv_dtype);
  const int32_t block_size = 16;
  const int max_batch = *std::max_element(a.batches.begin(), a.batches.end());
  // Prompts longer than the context leave no room for the one sampled token: shorten them.
  std::vector<int> prefill_tokens;
  for (int len : a.prefill) {
    prefill_tokens.push_back(
        static_cast<int>(std::min<int64_t>(len, cfg->max_position_embeddings - 1)));
  }
  const int longest = *std::max_element(prefill_tokens.begin(), prefill_tokens.end());

  tandem::EngineOptions o;
  o.model_dir = a.dir;
  o.backend = a.backend;
  o.num_threads = a.threads;
  o.block_size = block_size;
  o.kv_dtype = kv_dtype;
  o.gpu_exact_activations = a.activations == "exact";
  o.gpu_graphs = a.cuda_graphs;
  o.enable_prefix_cache = false;
  // A whole prompt in one step (no chunking), all prompts of a decode batch in one step, and
  // every sequence of a batch in every decode step.
  o.max_batch_tokens = std::max({longest, max_batch * a.decode_prompt_len, 2048});
  o.max_num_seqs = std::max(max_batch, 256);
  // KV for the largest decode batch at its full length, or for the longest prompt, whichever is
  // more, plus one block for the warm-up request.
  auto blocks_for = [&](int64_t tokens) { return (tokens + block_size - 1) / block_size; };
  const int64_t kv_blocks_needed =
      std::max(max_batch * blocks_for(a.decode_prompt_len + a.decode_steps + 2),
               blocks_for(longest + 1)) +
      2;
  const int64_t kv_bytes_per_token = 2 * int64_t{cfg->num_layers} * cfg->num_kv_heads *
                                     cfg->head_dim * tandem::DTypeSize(kv_dtype);
  const int64_t kv_bytes_needed = kv_blocks_needed * block_size * kv_bytes_per_token;
  o.kv_cache_bytes = a.kv_cache_gib > 0 ? static_cast<int64_t>(a.kv_cache_gib * (1 << 30))
                                        : kv_bytes_needed;
  if (o.kv_cache_bytes < kv_bytes_needed) {
    Log(absl::StrCat("warning: --kv-cache-gib ", a.kv_cache_gib, " is below the ",
                     static_cast<double>(kv_bytes_needed) / (1 << 30), " GiB this run needs"));
  }

  Log(absl::StrCat("loading the engine (", a.backend, ", KV cache ", o.kv_cache_bytes / 1e6, " MB ",
                   a.kv_dtype, ") ..."));
  auto engine = tandem::Engine::Create(o);
  if (!engine.ok()) {
    std::fprintf(stderr, "engine_bench: %s\n", Message(engine.status()).c_str());
    return 1;
  }
  tandem::Engine& e = **engine;
  const tandem::ModelWeights& m = e.model();
  const tandem::ModelConfig& c = e.config();
  // Weights read per decode step: every matrix and norm once; the embedding is only gathered
  // (a few rows) unless the LM head is tied to it, in which case it is read whole. The same
  // tensors' element count is the parameter count of the prefill FLOPs.
  double weight_bytes = 0;
  double weight_params = 0;
  auto add = [&](const tandem::TensorView* t) {
    if (t) {
      weight_bytes += static_cast<double>(t->nbytes);
      weight_params += static_cast<double>(t->numel());
    }
  };
  add(m.lm_head);
  add(m.final_norm);
  for (const auto& L : m.layers) {
    for (auto* t : {L.attn_norm, L.wq, L.wk, L.wv, L.wo, L.bq, L.bk, L.bv, L.q_norm, L.k_norm,
                    L.mlp_norm, L.w_gate, L.w_up, L.w_down}) {
      add(t);
    }
  }
  const double roofline_tps = bw > 0 ? bw * 1e9 / weight_bytes : 0;

  Runner run(e, a);
  // Warm-up (page in the weights, first kernel launches).
  if (auto w = e.Generate(run.Request(16, 99, 2)); !w.ok()) {
    std::fprintf(stderr, "engine_bench: warm-up: %s\n", Message(w.status()).c_str());
    return 1;
  }

  json decode_tps = json::object();
  json decode_step_ms = json::object();
  json decode_reps = json::object();
  for (int batch : a.batches) {
    const std::string key = std::to_string(batch);
    absl::StatusOr<std::vector<double>> timed =
        Repeat(a, [&](int r) { return run.DecodeOnce(batch, 1000 * (r + 1)); });
    if (!timed.ok()) {
      errors["decode_b" + key] = Message(timed.status());
      Log(absl::StrCat("  decode batch ", batch, " FAILED: ", Message(timed.status())));
      continue;
    }
    const std::vector<double>& times = *timed;
    const double med = Median(times);
    decode_tps[key] = static_cast<double>(batch) * a.decode_steps / med;
    decode_step_ms[key] = med / a.decode_steps * 1e3;
    decode_reps[key] = times;
    Log(absl::StrCat("  decode batch ", batch, ": ", decode_tps[key].get<double>(), " tok/s (",
                     decode_step_ms[key].get<double>(), " ms/step)"));
  }

  json prefill = json::object();
  for (size_t i = 0; i < a.prefill.size(); ++i) {
    const std::string key = std::to_string(a.prefill[i]);
    const int tokens = prefill_tokens[i];
    absl::StatusOr<std::vector<double>> timed =
        Repeat(a, [&](int r) { return run.PrefillOnce(tokens, 7 + r); });
    if (!timed.ok()) {
      errors["prefill_" + key] = Message(timed.status());
      Log(absl::StrCat("  prefill ", key, " FAILED: ", Message(timed.status())));
      continue;
    }
    const std::vector<double>& times = *timed;
    const double med = Median(times);
    const double t = tokens;
    const double flops = 2.0 * weight_params * t +
                         2.0 * 2.0 * c.num_layers * c.num_heads * c.head_dim * (t * t / 2);
    const double achieved = flops / med / 1e12;
    json p = {{"tokens", tokens},
              {"tokens_per_s", t / med},
              {"seconds", med},
              {"seconds_reps", times},
              {"flops", flops},
              {"achieved_tflops", achieved},
              {"mfu_vs_measured_gemm", nullptr},
              {"mfu_vs_peak", nullptr}};
    if (gemm_tflops.is_number()) p["mfu_vs_measured_gemm"] = achieved / gemm_tflops.get<double>();
    if (a.peak_tflops) p["mfu_vs_peak"] = achieved / *a.peak_tflops;
    if (tokens != a.prefill[i]) p["note"] = "shortened to the model's context - 1";
    Log(absl::StrCat("  prefill ", tokens, ": ", t / med, " tok/s, ", achieved, " TFLOP/s"));
    if (a.export_kv) {
      SinkTransfer sink;
      const tandem::KvStoreLayout& kv = e.backend().kv_store().layout();
      // K and V of one token in one layer; the whole prompt's KV is that x 2 x layers x tokens.
      const int64_t token_bytes =
          kv.geometry.token_elems() * static_cast<int64_t>(tandem::DTypeSize(kv.dtype));
      const int64_t want_bytes = 2 * int64_t{kv.geometry.num_layers} * token_bytes * tokens;
      absl::StatusOr<std::vector<double>> exported = Repeat(a, [&](int r) {
        sink.Reset(token_bytes);
        return run.PrefillOnce(tokens, 7 + r, &sink);
      });
      if (!exported.ok()) {
        errors["prefill_export_" + key] = Message(exported.status());
        Log(absl::StrCat("  prefill ", key, " with KV export FAILED: ",
                         Message(exported.status())));
      } else if (sink.bytes() != want_bytes) {
        errors["prefill_export_" + key] =
            absl::StrCat("the sink got ", sink.bytes(), " bytes, want ", want_bytes);
      } else {
        const double emed = Median(*exported);
        p["with_kv_export"] = {{"tokens_per_s", t / emed},
                               {"seconds", emed},
                               {"seconds_reps", *exported},
                               {"kv_bytes", sink.bytes()},
                               {"slowdown", emed / med}};
        Log(absl::StrCat("  prefill ", tokens, " with KV export: ", t / emed, " tok/s (x",
                         emed / med, " the time)"));
      }
    }
    prefill[key] = p;
  }

  json b1_fraction = nullptr;
  if (decode_tps.contains("1") && roofline_tps > 0) {
    b1_fraction = decode_tps["1"].get<double>() / roofline_tps;
  }
  json graph_stats = nullptr;
#if defined(TANDEM_HAVE_CUDA_BACKEND)
  if (cuda) {
    const tandem::CudaGraphStats g = tandem::GetCudaGraphStats(e.backend());
    graph_stats = {{"captured", g.captured}, {"replayed", g.replayed}, {"failed", g.failed}};
  }
#endif
  json out = {
      {"tool", "bench/engine/engine_bench"},
      {"backend", a.backend},
      {"preset", preset},
      {"model_dir", fs::absolute(a.dir).string()},
      {"model_write_seconds", model_write_seconds},
      {"config",
       {{"architecture", c.architecture},
        {"layers", c.num_layers},
        {"hidden", c.hidden_size},
        {"intermediate", c.intermediate_size},
        {"heads", c.num_heads},
        {"kv_heads", c.num_kv_heads},
        {"head_dim", c.head_dim},
        {"vocab", c.vocab_size},
        {"tie_word_embeddings", c.tie_word_embeddings},
        {"weight_dtype", std::string(tandem::DTypeName(m.layers.at(0).wq->dtype))}}},
      {"threads", a.threads},
      {"gpu", gpu},
      {"cuda_graph_stats", graph_stats},
      {"settings",
       {{"batches", a.batches},
        {"prefill_lengths", a.prefill},
        {"decode_prompt_len", a.decode_prompt_len},
        {"decode_steps", a.decode_steps},
        {"reps", a.reps},
        {"warmup_reps", a.warmup_reps},
        {"statistic", "median of reps (baselines: best of several)"},
        {"kv_dtype", a.kv_dtype},
        {"activations", cuda ? json(a.activations) : json(nullptr)},
        {"cuda_graphs", a.cuda_graphs},
        {"export_kv", a.export_kv},
        {"kv_cache_bytes", o.kv_cache_bytes},
        {"block_size", block_size},
        {"max_batch_tokens", o.max_batch_tokens},
        {"max_num_seqs", o.max_num_seqs},
        {"prefix_cache", false},
        {"prefill_method",
         "one prompt per run, max_batch_tokens >= the longest prompt so it runs as one step (no "
         "chunking); the Step() calls until its first token are timed"},
        {"decode_method",
         "batch sequences of decode_prompt_len tokens; their prefill and first decode step "
         "untimed, then decode_steps steps in which every sequence decodes, timed"}}},
      {"read_bandwidth_gbps", bw},
      {"read_bandwidth_source",
       cuda ? "2 x device_copy_gbps (read + write traffic of the copy)"
            : "host: threads summing a 1 GiB buffer, best of 5"},
      {"device_copy_gbps", device_copy_gbps},
      {"device_copy_gbps_convention",
       cuda ? json(
       "bytes copied device to device per second (1 GB = 1e9 B), best of 10 copies of "
       "copy_mib: each byte is read once and written once, so the memory traffic is twice "
       "this; read_bandwidth_gbps (the roofline's) is that traffic, 2 x device_copy_gbps, as "
       "copy_gbps in bench/gpu/torch_peer.py") : json(nullptr)},
      {"gemm_tflops", gemm_tflops},
      {"gemm_shape", {a.gemm_n, a.gemm_n, a.gemm_n}},
      {"weight_bytes_per_token", weight_bytes},
      {"weight_params_per_token", weight_params},
      {"roofline_decode_tokens_per_s", roofline_tps > 0 ? json(roofline_tps) : json()},
      {"decode_tokens_per_s", decode_tps},
      {"decode_step_ms", decode_step_ms},
      {"decode_seconds_reps", decode_reps},
      {"batch1_fraction_of_roofline", b1_fraction},
      {"prefill", prefill},
      {"peak_tflops", a.peak_tflops ? json(*a.peak_tflops) : json(nullptr)},
      {"flops_formula",
       "flops(T) = 2 * P * T + 2 * 2 * L * H * D * T^2 / 2, P = weight_params_per_token "
       "(matrices incl. lm_head, norms, biases; not the embedding gather), L layers, H query "
       "heads, D head_dim: QK^T and PV over the causal half of the T x T scores; "
       "MFU = flops / seconds / TFLOP/s"},
      {"errors", errors},
  };
  if (!cuda) {
    out["gemm_shape"] = nullptr;
  }

  if (a.json) {
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("model: %s (%s, random weights, %s), %.0f MB of weights read per decode step\n",
                a.preset.c_str(), a.dir.c_str(),
                std::string(tandem::DTypeName(m.layers.at(0).wq->dtype)).c_str(),
                weight_bytes / 1e6);
    if (cuda) {
      std::printf("gpu: %s\n", gpu.is_null() ? "?" : gpu["name"].get<std::string>().c_str());
      std::printf("device copy: %.1f GB/s (read; traffic twice that)\n", bw);
      std::printf("bf16 GEMM %d^3: %.1f TFLOP/s\n", a.gemm_n,
                  gemm_tflops.is_number() ? gemm_tflops.get<double>() : 0.0);
    } else {
      std::printf("host memory read bandwidth: %.2f GB/s\n", bw);
    }
    std::printf("batch-1 decode roofline: %.2f tok/s\n", roofline_tps);
    for (int batch : a.batches) {
      const std::string key = std::to_string(batch);
      if (!decode_tps.contains(key)) continue;
      std::printf("decode batch %d: %.2f tok/s (%.3f ms/step)", batch,
                  decode_tps[key].get<double>(), decode_step_ms[key].get<double>());
      if (batch == 1 && b1_fraction.is_number()) {
        std::printf(", %.0f%% of roofline", 100 * b1_fraction.get<double>());
      }
      std::printf("\n");
    }
    for (int len : a.prefill) {
      const std::string key = std::to_string(len);
      if (!prefill.contains(key)) continue;
      const json& p = prefill[key];
      std::printf("prefill %s: %.1f tok/s, %.2f TFLOP/s", key.c_str(),
                  p["tokens_per_s"].get<double>(), p["achieved_tflops"].get<double>());
      if (p["mfu_vs_measured_gemm"].is_number()) {
        std::printf(", MFU %.1f%% of measured GEMM", 100 * p["mfu_vs_measured_gemm"].get<double>());
      }
      if (p["mfu_vs_peak"].is_number()) {
        std::printf(", %.1f%% of %.0f TFLOP/s peak", 100 * p["mfu_vs_peak"].get<double>(),
                    *a.peak_tflops);
      }
      if (p.contains("with_kv_export")) {
        std::printf("; with KV export %.1f tok/s (x%.3f the time)",
                    p["with_kv_export"]["tokens_per_s"].get<double>(),
                    p["with_kv_export"]["slowdown"].get<double>());
      }
      std::printf("\n");
    }
    for (const auto& [key, msg] : errors.items()) {
      std::printf("error %s: %s\n", key.c_str(), msg.get<std::string>().c_str());
    }
  }
  return errors.empty() ? 0 : 1;
}
