// The CPU backend's layer-wise KV export (ForwardBatch::exports) against its own store, for the
// KV dtypes and block sizes a prefill worker runs with.
#include <gtest/gtest.h>

#include <string>
#include <tuple>

#include "engine/backend.h"
#include "engine/model.h"
#include "tests/engine/export_check.h"
#include "tests/engine/test_util.h"

namespace tandem {
namespace {

using testing_util::ExpectExportsMatchStore;
using testing_util::TestData;

class CpuExportTest : public ::testing::TestWithParam<std::tuple<int32_t, DType>> {};

TEST_P(CpuExportTest, EveryLayerOfEveryRangeEqualsTheStore) {
  auto model = LoadModelWeights(TestData("models/llama3_gqa_bf16"));
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& c = (*model)->config;
  const auto [block_size, dtype] = GetParam();
  const KvStoreLayout layout{KvGeometry{c.num_layers, c.num_kv_heads, c.head_dim}, block_size,
                             dtype, 64};
  BackendOptions opts;
  opts.num_threads = 2;
  auto backend = CreateCpuBackend(**model, layout, opts);
  ASSERT_TRUE(backend.ok()) << backend.status();
  std::vector<int32_t> a(37);
  std::vector<int32_t> b(9);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<int32_t>((i * 7 + 3) % c.vocab_size);
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<int32_t>((i * 11 + 5) % c.vocab_size);
  ExpectExportsMatchStore(**backend, a, b, c.vocab_size);
}

INSTANTIATE_TEST_SUITE_P(Layouts, CpuExportTest,
                         ::testing::Values(std::make_tuple(16, DType::kBF16),
                                           std::make_tuple(4, DType::kF32),
                                           std::make_tuple(1, DType::kF16)));

}  // namespace
}  // namespace tandem
