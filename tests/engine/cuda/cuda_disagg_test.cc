// Heterogeneous disaggregation through the engine: prefill on CUDA streaming its KV into a CPU
// decode engine, and the reverse, over the in-process data plane (the wire format's canonical
// layout in between). Greedy tokens must equal colocated runs on either backend. Skips without a
// CUDA device.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "engine/backends/cuda/cuda_backend.h"
#include "engine/engine.h"
#include "tests/engine/disagg_pair.h"
#include "tests/engine/test_util.h"

namespace tandem {
namespace {

using testing_util::ExpectAllFree;
using testing_util::Local;
using testing_util::Options;
using testing_util::Pair;
using testing_util::Prompt;
using testing_util::Request;
using testing_util::TestData;

EngineOptions On(const std::string& backend, const std::string& dir, int32_t block_size,
                 DType dtype) {
  EngineOptions o = Options(dir, block_size, dtype);
  o.backend = backend;
  return o;
}

class CudaDisaggTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) {
      GTEST_SKIP() << "no CUDA device";
    }
    dir_ = TestData("models/" + GetParam());
  }
  std::string dir_;
};

TEST_P(CudaDisaggTest, PrefillOnCudaDecodeOnCpuGivesTheColocatedTokens) {
  const auto pre = On("cuda", dir_, 16, DType::kF32);
  const auto dec = On("cpu", dir_, 4, DType::kF32);
  Pair pair(pre, dec);
  const int vocab = pair.prefill().config().vocab_size;
  for (int len : {1, 15, 16, 17, 50}) {
    const auto r = Request(Prompt(len, len, vocab), 12);
    const auto got = pair.Run(r);
    EXPECT_EQ(got, Local(dec, r)) << "vs colocated cpu, prompt length " << len;
    EXPECT_EQ(got, Local(pre, r)) << "vs colocated cuda, prompt length " << len;
  }
  ExpectAllFree(pair.prefill());
  ExpectAllFree(pair.decode());
}

TEST_P(CudaDisaggTest, PrefillOnCpuDecodeOnCudaGivesTheColocatedTokens) {
  const auto pre = On("cpu", dir_, 8, DType::kF32);
  const auto dec = On("cuda", dir_, 32, DType::kF32);
  Pair pair(pre, dec);
  const int vocab = pair.prefill().config().vocab_size;
  for (int len : {1, 7, 8, 9, 40}) {
    const auto r = Request(Prompt(len, 3 * len, vocab), 12);
    const auto got = pair.Run(r);
    EXPECT_EQ(got, Local(pre, r)) << "vs colocated cpu, prompt length " << len;
    EXPECT_EQ(got, Local(dec, r)) << "vs colocated cuda, prompt length " << len;
  }
  ExpectAllFree(pair.prefill());
  ExpectAllFree(pair.decode());
}

TEST_P(CudaDisaggTest, CudaToCudaAcrossBlockSizesAndDtypes) {
  // Same dtype on both sides (bf16 KV rounds the same way in a colocated bf16 run).
  const auto pre = On("cuda", dir_, 16, DType::kBF16);
  Pair pair(pre, On("cuda", dir_, 8, DType::kBF16));
  const int vocab = pair.prefill().config().vocab_size;
  const auto r = Request(Prompt(33, 2, vocab), 10);
  EXPECT_EQ(pair.Run(r), Local(pre, r));
  // f32 prefill KV into an f16 decode store: converted on the device; a full-length answer.
  Pair mixed(On("cuda", dir_, 16, DType::kF32), On("cuda", dir_, 4, DType::kF16));
  EXPECT_EQ(mixed.Run(r).size(), 10u);
  ExpectAllFree(pair.decode());
  ExpectAllFree(mixed.decode());
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaDisaggTest,
                         ::testing::Values("llama3_gqa_bf16", "qwen2_tied_bias_bf16"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace tandem
