// Device KV store: paged blocks in device memory; canonical-layout transfers staged through
// pinned host memory, converted and scattered/gathered on the device.
#include "engine/backends/cuda/device_kv_store.h"

#include <algorithm>
#include <cstring>

#include "engine/backends/cuda/cuda_util.h"
#include "engine/backends/cuda/kernels.h"

namespace tandem {

using cuda_internal::DeviceBuffer;
using cuda_internal::PinnedBuffer;

namespace {
// Bytes of K+V data moved per staging pass; bounds pinned memory whatever the transfer size.
constexpr size_t kStagingDataBytes = size_t{8} << 20;

size_t AlignUp(size_t n, size_t a) { return (n + a - 1) / a * a; }
}  // namespace

struct DeviceKvStore::Staging {
  cudaStream_t stream = nullptr;
  PinnedBuffer host;    // [k | v | table]
  DeviceBuffer device;  // same layout
  ~Staging() {
    if (stream != nullptr) {
      cudaStreamDestroy(stream);
    }
  }
};

DeviceKvStore::DeviceKvStore(const KvStoreLayout& layout, int device)
    : layout_(layout),
      device_(device),
      layer_bytes_(static_cast<size_t>(layout.num_blocks) * layout.block_size *
                   layout.geometry.token_elems() * DTypeSize(layout.dtype)) {}

DeviceKvStore::~DeviceKvStore() {
  cudaSetDevice(device_);
  {
    absl::MutexLock lock(&mu_);
    staging_.reset();
  }
  if (k_ != nullptr) {
    cudaFree(k_);
  }
  if (v_ != nullptr) {
    cudaFree(v_);
  }
}

absl::StatusOr<std::unique_ptr<DeviceKvStore>> DeviceKvStore::Create(const KvStoreLayout& layout,
                                                                     int device) {
  if (layout.num_blocks <= 0 || layout.block_size <= 0 || layout.geometry.num_layers <= 0 ||
      layout.geometry.token_elems() <= 0) {
    return absl::InvalidArgumentError("device KV store needs a non-empty layout");
  }
  TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  std::unique_ptr<DeviceKvStore> store(new DeviceKvStore(layout, device));
  const size_t bytes = store->layer_bytes_ * layout.geometry.num_layers;
  void* k = nullptr;
  void* v = nullptr;
  if (cudaError_t err = cudaMalloc(&k, bytes); err != cudaSuccess) {
    cudaGetLastError();
    return cuda_internal::AllocError(err, bytes, "KV store (K)");
  }
  store->k_ = static_cast<std::byte*>(k);
  if (cudaError_t err = cudaMalloc(&v, bytes); err != cudaSuccess) {
    cudaGetLastError();
    return cuda_internal::AllocError(err, bytes, "KV store (V)");
  }
  store->v_ = static_cast<std::byte*>(v);
  // A block never written reads as zeros, as in HostKvStore.
  TANDEM_CUDA_RETURN_IF_ERROR(cudaMemset(store->k_, 0, bytes));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaMemset(store->v_, 0, bytes));
  // cudaMemset may still run when it returns, and the backend's non-blocking streams do not
  // order after the legacy stream: finish it before any kernel can write a block.
  TANDEM_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());

  auto staging = std::make_unique<Staging>();
  TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&staging->stream, cudaStreamNonBlocking));
  {
    absl::MutexLock lock(&store->mu_);
    store->staging_ = std::move(staging);
  }
  return store;
}

absl::Status DeviceKvStore::WriteTokens(int32_t layer, std::span<const BlockId> table,
                                        int64_t first_token, int64_t n, DType src, const void* k,
                                        const void* v) {
  return Transfer(/*to_device=*/true, layer, table, first_token, n, src, k, v, nullptr, nullptr);
}

absl::Status DeviceKvStore::ReadTokens(int32_t layer, std::span<const BlockId> table,
                                       int64_t first_token, int64_t n, DType dst, void* k,
                                       void* v) const {
  return Transfer(/*to_device=*/false, layer, table, first_token, n, dst, nullptr, nullptr, k, v);
}

absl::Status DeviceKvStore::Transfer(bool to_device, int32_t layer,
                                     std::span<const BlockId> table, int64_t first_token,
                                     int64_t n, DType host_type, const void* k_in,
                                     const void* v_in, void* k_out, void* v_out) const {
  TANDEM_STATUS_RETURN_IF_ERROR(ValidateTokenRange(layout_, layer, table, first_token, n));
  if (n == 0) {
    return absl::OkStatus();
  }
  const int64_t te = layout_.geometry.token_elems();
  const int32_t bs = layout_.block_size;
  const size_t token_bytes = static_cast<size_t>(te) * DTypeSize(host_type);
  const int64_t tokens_per_pass =
      std::max<int64_t>(1, static_cast<int64_t>(kStagingDataBytes / (2 * token_bytes)));
  const int64_t max_pass = std::min(n, tokens_per_pass);
  const size_t data_bytes = AlignUp(static_cast<size_t>(max_pass) * token_bytes, 256);
  // A pass of m tokens starting anywhere touches at most m / bs + 2 blocks.
  const size_t table_bytes = (static_cast<size_t>(max_pass) / bs + 2) * sizeof(int32_t);
  const size_t total = 2 * data_bytes + table_bytes;

  absl::MutexLock lock(&mu_);
  TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  TANDEM_STATUS_RETURN_IF_ERROR(staging_->host.Reserve(total, "KV staging (host)"));
  TANDEM_STATUS_RETURN_IF_ERROR(staging_->device.Reserve(total, "KV staging (device)"));
  std::byte* h = staging_->host.bytes_ptr();
  std::byte* d = staging_->device.as<std::byte>();
  cudaStream_t stream = staging_->stream;

  for (int64_t done = 0; done < n;) {
    const int64_t m = std::min(n - done, tokens_per_pass);
    const int64_t t0 = first_token + done;
    const int64_t b0 = t0 / bs;
    const int64_t nb = (t0 + m - 1) / bs - b0 + 1;
    const size_t bytes = static_cast<size_t>(m) * token_bytes;
    std::memcpy(h + 2 * data_bytes, table.data() + b0, nb * sizeof(int32_t));

    gpu::PagedCopyArgs args;
    args.table = reinterpret_cast<const int32_t*>(d + 2 * data_bytes);
    args.first_token = t0;
    args.num_tokens = m;
    args.block_size = bs;
    args.token_elems = te;
    if (to_device) {
      std::memcpy(h, static_cast<const std::byte*>(k_in) + done * token_bytes, bytes);
      std::memcpy(h + data_bytes, static_cast<const std::byte*>(v_in) + done * token_bytes, bytes);
      TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(d, h, total, cudaMemcpyHostToDevice, stream));
      args.src_k = d;
      args.src_v = d + data_bytes;
      args.src_type = host_type;
      args.dst_k = KLayer(layer);
      args.dst_v = VLayer(layer);
      args.dst_type = layout_.dtype;
      TANDEM_CUDA_RETURN_IF_ERROR(gpu::LaunchScatterTokens(args, stream));
      TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    } else {
      TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(d + 2 * data_bytes, h + 2 * data_bytes,
                                                  nb * sizeof(int32_t), cudaMemcpyHostToDevice,
                                                  stream));
      args.src_k = KLayer(layer);
      args.src_v = VLayer(layer);
      args.src_type = layout_.dtype;
      args.dst_k = d;
      args.dst_v = d + data_bytes;
      args.dst_type = host_type;
      TANDEM_CUDA_RETURN_IF_ERROR(gpu::LaunchGatherTokens(args, stream));
      TANDEM_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(h, d, 2 * data_bytes, cudaMemcpyDeviceToHost, stream));
      TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
      std::memcpy(static_cast<std::byte*>(k_out) + done * token_bytes, h, bytes);
      std::memcpy(static_cast<std::byte*>(v_out) + done * token_bytes, h + data_bytes, bytes);
    }
    done += m;
  }
  return absl::OkStatus();
}

}  // namespace tandem
