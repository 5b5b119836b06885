// Backend helpers shared by the host-memory backends.
#include "engine/backend.h"

#include <cstddef>
#include <memory>
#include <vector>

namespace tandem {

absl::Status ExportLayerFromStore(const KvStore& store, int32_t layer, const ForwardBatch& batch) {
  if (batch.on_kv_export == nullptr || !*batch.on_kv_export) {
    return absl::OkStatus();
  }
  const DType dtype = store.layout().dtype;
  const size_t token_bytes =
      static_cast<size_t>(store.layout().geometry.token_elems()) * DTypeSize(dtype);
  for (size_t i = 0; i < batch.exports.size(); ++i) {
    const KvExportRange& r = batch.exports[i];
    // A copy of its own: the receiver of the slice may hold it after the blocks are reused.
    const size_t bytes = static_cast<size_t>(r.count) * token_bytes;
    auto buf = std::make_shared<std::vector<std::byte>>(2 * bytes);
    std::byte* k = buf->data();
    std::byte* v = k + bytes;
    if (absl::Status st = store.ReadTokens(layer, batch.chunks[r.chunk].block_table, r.first_token,
                                           r.count, dtype, k, v);
        !st.ok()) {
      return st;
    }
    ExportedKv e;
    e.layer = layer;
    e.range = static_cast<int32_t>(i);
    e.k = k;
    e.v = v;
    e.keep_alive = std::move(buf);
    (*batch.on_kv_export)(std::move(e));
  }
  return absl::OkStatus();
}

}  // namespace tandem
