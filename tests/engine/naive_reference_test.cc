// Every supported architecture against a naive double-precision forward pass written from the
// formulas (Qwen3's q/k norm has no Hugging Face fixture, so this is its reference). Models are
// made by the project's random-model writer with small, non-trivial weights.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "engine/engine.h"
#include "engine/model_factory.h"

namespace tandem {
namespace {

using Vec = std::vector<double>;

Vec Row(const TensorView& t, int64_t row) {
  const int64_t cols = t.shape.size() == 2 ? t.shape[1] : t.shape[0];
  std::vector<float> f(cols);
  ToF32(t.dtype, t.data + row * cols * DTypeSize(t.dtype), f.data(), cols);
  return Vec(f.begin(), f.end());
}

Vec MatVec(const TensorView& w, const Vec& x) {
  Vec y(w.shape[0]);
  for (int64_t n = 0; n < w.shape[0]; ++n) {
    const Vec r = Row(w, n);
    double s = 0;
    for (size_t k = 0; k < x.size(); ++k) s += r[k] * x[k];
    y[n] = s;
  }
  return y;
}

Vec RmsNorm(const Vec& x, const TensorView& w, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double scale = 1.0 / std::sqrt(ss / x.size() + eps);
  const Vec g = Row(w, 0);
  Vec y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * scale * g[i];
  return y;
}

void Rope(double* x, int64_t hd, int64_t pos, double theta) {
  for (int64_t i = 0; i < hd / 2; ++i) {
    const double inv = 1.0 / std::pow(theta, 2.0 * i / hd);
    const double c = std::cos(pos * inv), s = std::sin(pos * inv);
    const double a = x[i], b = x[i + hd / 2];
    x[i] = a * c - b * s;
    x[i + hd / 2] = b * c + a * s;
  }
}

// Logits of the last position of `ids`.
Vec NaiveForward(const ModelWeights& m, const std::vector<int32_t>& ids) {
  const ModelConfig& c = m.config;
  const int64_t hd = c.head_dim, nh = c.num_heads, nkv = c.num_kv_heads;
  const int64_t T = static_cast<int64_t>(ids.size());
  std::vector<Vec> x(T);
  for (int64_t t = 0; t < T; ++t) x[t] = Row(*m.embed, ids[t]);
  for (const LayerWeights& L : m.layers) {
    std::vector<Vec> q(T), k(T), v(T);
    for (int64_t t = 0; t < T; ++t) {
      const Vec h = RmsNorm(x[t], *L.attn_norm, c.rms_norm_eps);
      q[t] = MatVec(*L.wq, h);
      k[t] = MatVec(*L.wk, h);
      v[t] = MatVec(*L.wv, h);
      if (L.bq) {
        const Vec bq = Row(*L.bq, 0), bk = Row(*L.bk, 0), bv = Row(*L.bv, 0);
        for (size_t i = 0; i < q[t].size(); ++i) q[t][i] += bq[i];
        for (size_t i = 0; i < k[t].size(); ++i) k[t][i] += bk[i], v[t][i] += bv[i];
      }
      for (int64_t h2 = 0; h2 < nh; ++h2) {
        if (L.q_norm) {
          Vec head(q[t].begin() + h2 * hd, q[t].begin() + (h2 + 1) * hd);
          head = RmsNorm(head, *L.q_norm, c.rms_norm_eps);
          std::copy(head.begin(), head.end(), q[t].begin() + h2 * hd);
        }
        Rope(&q[t][h2 * hd], hd, t, c.rope_theta);
      }
      for (int64_t h2 = 0; h2 < nkv; ++h2) {
        if (L.k_norm) {
          Vec head(k[t].begin() + h2 * hd, k[t].begin() + (h2 + 1) * hd);
          head = RmsNorm(head, *L.k_norm, c.rms_norm_eps);
          std::copy(head.begin(), head.end(), k[t].begin() + h2 * hd);
        }
        Rope(&k[t][h2 * hd], hd, t, c.rope_theta);
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      Vec attn(nh * hd, 0.0);
      for (int64_t h2 = 0; h2 < nh; ++h2) {
        const int64_t kvh = h2 / (nh / nkv);
        Vec s(t + 1);
        double mx = -1e300;
        for (int64_t j = 0; j <= t; ++j) {
          double d = 0;
          for (int64_t i = 0; i < hd; ++i) d += q[t][h2 * hd + i] * k[j][kvh * hd + i];
          s[j] = d / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[j]);
        }
        double z = 0;
        for (double& e : s) z += (e = std::exp(e - mx));
        for (int64_t j = 0; j <= t; ++j) {
          for (int64_t i = 0; i < hd; ++i) attn[h2 * hd + i] += s[j] / z * v[j][kvh * hd + i];
        }
      }
      const Vec o = MatVec(*L.wo, attn);
      for (size_t i = 0; i < o.size(); ++i) x[t][i] += o[i];
      const Vec h = RmsNorm(x[t], *L.mlp_norm, c.rms_norm_eps);
      Vec g = MatVec(*L.w_gate, h);
      const Vec u = MatVec(*L.w_up, h);
      for (size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
      const Vec d = MatVec(*L.w_down, g);
      for (size_t i = 0; i < d.size(); ++i) x[t][i] += d[i];
    }
  }
  return MatVec(*m.lm_head, RmsNorm(x[T - 1], *m.final_norm, c.rms_norm_eps));
}

class NaiveReferenceTest : public ::testing::TestWithParam<std::string> {};

TEST_P(NaiveReferenceTest, LastLogitsMatchTheFormulas) {
  RandomModelSpec spec;
  spec.architecture = GetParam();
  spec.vocab_size = 300;
  spec.hidden_size = 64;
  spec.intermediate_size = 96;
  spec.num_heads = 4;
  spec.num_kv_heads = 2;
  spec.head_dim = 32;  // != hidden / heads
  spec.rope_theta = 10000.0f;
  spec.dtype = DType::kF32;
  spec.seed = 11;
  const std::string dir =
      (std::filesystem::path(::testing::TempDir()) / ("naive_" + GetParam())).string();
  ASSERT_TRUE(WriteRandomModel(dir, spec).ok());
  EngineOptions o;
  o.model_dir = dir;
  o.num_kv_blocks = 16;
  o.block_size = 4;
  o.num_threads = 2;
  auto e = Engine::Create(o);
  ASSERT_TRUE(e.ok()) << e.status();
  const ModelWeights& m = (*e)->model();
  EXPECT_EQ(m.layers[0].q_norm != nullptr, GetParam() == "Qwen3ForCausalLM");
  EXPECT_EQ(m.layers[0].bq != nullptr, GetParam() == "Qwen2ForCausalLM");

  const std::vector<int32_t> ids = {256, 72, 101, 108, 108, 111, 44, 32, 119};
  SequenceRequest r;
  r.prompt_ids = ids;
  r.sampling.temperature = 0.0f;
  r.sampling.max_tokens = 1;
  r.want_prompt_logits = true;
  auto got = (*e)->Generate(r);
  ASSERT_TRUE(got.ok()) << got.status();
  const Vec want = NaiveForward(m, ids);
  double max_diff = 0, max_ref = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    max_diff = std::max(max_diff, std::fabs(got->prompt_logits[i] - want[i]));
    max_ref = std::max(max_ref, std::fabs(want[i]));
  }
  EXPECT_LE(max_diff / max_ref, 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Architectures, NaiveReferenceTest,
                         ::testing::Values("LlamaForCausalLM", "MistralForCausalLM",
                                           "Qwen2ForCausalLM", "Qwen3ForCausalLM"));

}  // namespace
}  // namespace tandem
