// Shared check of a backend's layer-wise KV export (ForwardBatch::exports): used by the CPU
// backend's tests and, on a device, by the CUDA backend's.
#pragma once

#include <gtest/gtest.h>

#include <cstddef>
#include <cstring>
#include <functional>
#include <set>
#include <utility>
#include <vector>

#include "engine/backend.h"
#include "kvcache/block_pool.h"
#include "kvcache/kv_store.h"

namespace tandem::testing_util {

// Runs two sequences through `backend` in two steps: step 1 computes the first half of `a`
// without exporting; step 2 computes the rest of `a` next to the whole of `b`, exporting a from
// token 0 (tokens of an earlier step, as after prefix-cache hits) and b from token 1 (a range
// that starts inside a block). Every (layer, range) must arrive exactly once, in layer order,
// holding what the store holds for those tokens afterwards, and stay readable while its
// keep_alive is held. Then invalid ranges must be refused before anything runs.
inline void ExpectExportsMatchStore(Backend& backend, const std::vector<int32_t>& a,
                                    const std::vector<int32_t>& b, int32_t vocab) {
  const KvStore& store = backend.kv_store();
  const KvStoreLayout& layout = store.layout();
  const int32_t bs = layout.block_size;
  ASSERT_GE(a.size(), 2u);
  ASSERT_GE(b.size(), 2u);
  BlockPool pool(layout.num_blocks, bs);
  auto table_for = [&](size_t tokens) {
    auto ids = pool.Allocate(static_cast<int32_t>((tokens + bs - 1) / bs));
    EXPECT_TRUE(ids.ok()) << ids.status();
    return ids.ok() ? *ids : std::vector<BlockId>{};
  };
  const std::vector<BlockId> table_a = table_for(a.size());
  const std::vector<BlockId> table_b = table_for(b.size());
  const int64_t half = static_cast<int64_t>(a.size()) / 2;

  {
    SequenceChunk first;
    first.tokens = std::span<const int32_t>(a).first(static_cast<size_t>(half));
    first.block_table = table_a;
    ForwardBatch batch;
    batch.chunks = std::span<const SequenceChunk>(&first, 1);
    ASSERT_TRUE(backend.Forward(batch, {}).ok());
  }

  std::vector<SequenceChunk> chunks(2);
  chunks[0].tokens = std::span<const int32_t>(a).subspan(static_cast<size_t>(half));
  chunks[0].start_pos = half;
  chunks[0].block_table = table_a;
  chunks[0].want_logits = true;
  chunks[1].tokens = b;
  chunks[1].block_table = table_b;
  chunks[1].want_logits = true;
  const std::vector<KvExportRange> ranges = {
      {0, 0, static_cast<int64_t>(a.size())},
      {1, 1, static_cast<int64_t>(b.size()) - 1},
  };
  std::vector<ExportedKv> got;
  const KvExportCallback collect = [&](ExportedKv kv) { got.push_back(std::move(kv)); };
  ForwardBatch batch;
  batch.chunks = chunks;
  batch.exports = ranges;
  batch.on_kv_export = &collect;
  std::vector<float> logits(2 * static_cast<size_t>(vocab));
  const absl::Status st = backend.Forward(batch, logits);
  ASSERT_TRUE(st.ok()) << st;

  const int32_t layers = layout.geometry.num_layers;
  ASSERT_EQ(got.size(), static_cast<size_t>(layers) * ranges.size());
  const size_t token_bytes =
      static_cast<size_t>(layout.geometry.token_elems()) * DTypeSize(layout.dtype);
  std::set<std::pair<int32_t, int32_t>> seen;
  for (size_t i = 0; i < got.size(); ++i) {
    const ExportedKv& kv = got[i];
    EXPECT_EQ(kv.layer, static_cast<int32_t>(i / ranges.size())) << "layer order";
    EXPECT_EQ(kv.range, static_cast<int32_t>(i % ranges.size())) << "range order";
    ASSERT_TRUE(kv.range >= 0 && kv.range < 2);
    EXPECT_TRUE(seen.emplace(kv.layer, kv.range).second);
    EXPECT_NE(kv.keep_alive, nullptr);
    const KvExportRange& r = ranges[kv.range];
    const size_t bytes = static_cast<size_t>(r.count) * token_bytes;
    std::vector<std::byte> k(bytes);
    std::vector<std::byte> v(bytes);
    ASSERT_TRUE(store
                    .ReadTokens(kv.layer, chunks[r.chunk].block_table, r.first_token, r.count,
                                layout.dtype, k.data(), v.data())
                    .ok());
    EXPECT_EQ(std::memcmp(kv.k, k.data(), bytes), 0) << "K of layer " << kv.layer << " range "
                                                     << kv.range;
    EXPECT_EQ(std::memcmp(kv.v, v.data(), bytes), 0) << "V of layer " << kv.layer << " range "
                                                     << kv.range;
  }

  // Bad ranges: INVALID_ARGUMENT, and the callback never runs.
  const std::vector<std::vector<KvExportRange>> bad = {
      {{2, 0, 1}},                                          // no such chunk
      {{-1, 0, 1}},                                         // no such chunk
      {{1, 0, 0}},                                          // empty
      {{1, 0, static_cast<int64_t>(b.size()) + 1}},         // past the chunk's end
      {{0, -1, 2}},                                         // negative start
      {{0, static_cast<int64_t>(a.size()), 1}},             // starts at the end
  };
  for (const auto& r : bad) {
    got.clear();
    batch.exports = r;
    const absl::Status refused = backend.Forward(batch, logits);
    EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument) << refused;
    EXPECT_TRUE(got.empty());
  }
}

}  // namespace tandem::testing_util
