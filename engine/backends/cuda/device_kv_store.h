// KV blocks in CUDA device memory, behind the KvStore interface. Host-side reads and writes (the
// KV data plane, tests) stage through pinned host memory and convert dtype on the device; the
// CUDA backend's kernels read and write the blocks in place.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kvcache/kv_store.h"

namespace tandem {

class DeviceKvStore final : public KvStore {
 public:
  // Allocates (and zeroes) 2 * num_layers * num_blocks blocks on `device`.
  static absl::StatusOr<std::unique_ptr<DeviceKvStore>> Create(const KvStoreLayout& layout,
                                                               int device);
  ~DeviceKvStore() override;
  DeviceKvStore(const DeviceKvStore&) = delete;
  DeviceKvStore& operator=(const DeviceKvStore&) = delete;

  const KvStoreLayout& layout() const override { return layout_; }
  // Both calls are synchronous: the data is in place (or out) when they return. Thread-safe with
  // respect to each other; the caller orders them against forward passes touching the same
  // blocks (as with the host store).
  absl::Status WriteTokens(int32_t layer, std::span<const BlockId> table, int64_t first_token,
                           int64_t n, DType src, const void* k, const void* v) override;
  absl::Status ReadTokens(int32_t layer, std::span<const BlockId> table, int64_t first_token,
                          int64_t n, DType dst, void* k, void* v) const override;

  // Device address of one layer's K (V): [num_blocks * block_size][kv_heads][head_dim] elements
  // of layout().dtype.
  void* KLayer(int32_t layer) const { return k_ + layer * layer_bytes_; }
  void* VLayer(int32_t layer) const { return v_ + layer * layer_bytes_; }
  size_t total_bytes() const { return 2 * layer_bytes_ * layout_.geometry.num_layers; }
  int device() const { return device_; }

 private:
  DeviceKvStore(const KvStoreLayout& layout, int device);
  // Moves tokens between canonical host buffers and the paged device layout, in passes bounded
  // by the staging size.
  absl::Status Transfer(bool to_device, int32_t layer, std::span<const BlockId> table,
                        int64_t first_token, int64_t n, DType host_type, const void* k_in,
                        const void* v_in, void* k_out, void* v_out) const;

  const KvStoreLayout layout_;
  const int device_;
  const size_t layer_bytes_;
  std::byte* k_ = nullptr;
  std::byte* v_ = nullptr;

  // Staging for WriteTokens/ReadTokens (const: reads stage too).
  struct Staging;
  mutable absl::Mutex mu_;
  std::unique_ptr<Staging> staging_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tandem
