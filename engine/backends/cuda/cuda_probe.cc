// Device baselines for the benchmarks: copy bandwidth and bf16 GEMM throughput, each the best of
// several timed runs after a warm-up (anything slower than the best run is interference, not
// what the hardware can do).
#include "engine/backends/cuda/cuda_probe.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backends/cuda/cuda_util.h"
#include "kvcache/dtype.h"

namespace tandem {
namespace {

using cuda_internal::DeviceBuffer;

// Selects `device`, or says why it cannot be used.
absl::Status UseDevice(int device) {
  int count = 0;
  if (cudaError_t err = cudaGetDeviceCount(&count); err != cudaSuccess) {
    cudaGetLastError();  // "no driver" / "no device" are not sticky
    return absl::FailedPreconditionError(absl::StrCat(
        "no usable CUDA device: ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
  }
  if (count == 0) {
    return absl::FailedPreconditionError("no CUDA device is available");
  }
  if (device < 0 || device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", device, " requested; ", count, " present"));
  }
  TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  return absl::OkStatus();
}

// A stream and a pair of timing events, destroyed with the object.
class Timer {
 public:
  Timer() = default;
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;
  ~Timer() {
    if (stop_ != nullptr) cudaEventDestroy(stop_);
    if (start_ != nullptr) cudaEventDestroy(start_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  absl::Status Init() {
    TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    TANDEM_CUDA_RETURN_IF_ERROR(cudaEventCreate(&start_));
    TANDEM_CUDA_RETURN_IF_ERROR(cudaEventCreate(&stop_));
    return absl::OkStatus();
  }

  cudaStream_t stream() const { return stream_; }

  // Seconds the work that `enqueue` puts on the stream takes on the device.
  template <typename Enqueue>
  absl::StatusOr<double> Time(Enqueue enqueue) {
    TANDEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(start_, stream_));
    TANDEM_STATUS_RETURN_IF_ERROR(enqueue());
    TANDEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(stop_, stream_));
    TANDEM_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(stop_));
    float ms = 0;
    TANDEM_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start_, stop_));
    return ms * 1e-3;
  }

  // Best of `tries` timings, after `warmup` untimed runs.
  template <typename Enqueue>
  absl::StatusOr<double> Best(int warmup, int tries, Enqueue enqueue) {
    for (int i = 0; i < warmup; ++i) {
      TANDEM_STATUS_RETURN_IF_ERROR(enqueue());
    }
    TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    double best = std::numeric_limits<double>::infinity();
    for (int i = 0; i < tries; ++i) {
      absl::StatusOr<double> s = Time(enqueue);
      if (!s.ok()) {
        return s.status();
      }
      best = std::min(best, *s);
    }
    return best;
  }

 private:
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr;
  cudaEvent_t stop_ = nullptr;
};

class CublasHandle {
 public:
  CublasHandle() = default;
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  ~CublasHandle() {
    if (handle_ != nullptr) cublasDestroy(handle_);
  }
  absl::Status Init(cudaStream_t stream) {
    TANDEM_CUBLAS_RETURN_IF_ERROR(cublasCreate(&handle_));
    TANDEM_CUBLAS_RETURN_IF_ERROR(cublasSetStream(handle_, stream));
    return absl::OkStatus();
  }
  cublasHandle_t get() const { return handle_; }

 private:
  cublasHandle_t handle_ = nullptr;
};

}  // namespace

absl::StatusOr<CudaDeviceInfo> CudaDescribeDevice(int device) {
  TANDEM_STATUS_RETURN_IF_ERROR(UseDevice(device));
  CudaDeviceInfo info;
  cudaDeviceProp prop{};
  TANDEM_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  info.name = prop.name;
  info.compute_capability_major = prop.major;
  info.compute_capability_minor = prop.minor;
  info.sm_count = prop.multiProcessorCount;
  info.total_memory_bytes = static_cast<int64_t>(prop.totalGlobalMem);
  int mem_clock_khz = 0;
  if (cudaDeviceGetAttribute(&mem_clock_khz, cudaDevAttrMemoryClockRate, device) == cudaSuccess) {
    info.theoretical_bandwidth_gbps = 2.0 * mem_clock_khz * 1e3 * (prop.memoryBusWidth / 8) / 1e9;
  } else {
    cudaGetLastError();
  }
  TANDEM_CUDA_RETURN_IF_ERROR(cudaDriverGetVersion(&info.driver_version));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaRuntimeGetVersion(&info.runtime_version));
  return info;
}

absl::StatusOr<double> CudaMeasureCopyBandwidthGBps(int device, size_t bytes) {
  if (bytes == 0) {
    return absl::InvalidArgumentError("copy bandwidth needs a non-empty buffer");
  }
  TANDEM_STATUS_RETURN_IF_ERROR(UseDevice(device));
  DeviceBuffer src;
  DeviceBuffer dst;
  TANDEM_STATUS_RETURN_IF_ERROR(src.Reserve(bytes, "copy bandwidth source"));
  TANDEM_STATUS_RETURN_IF_ERROR(dst.Reserve(bytes, "copy bandwidth destination"));
  // Touch both buffers once so that no first-use cost lands in a timed copy.
  TANDEM_CUDA_RETURN_IF_ERROR(cudaMemset(src.get(), 1, bytes));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaMemset(dst.get(), 0, bytes));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  Timer timer;
  TANDEM_STATUS_RETURN_IF_ERROR(timer.Init());
  absl::StatusOr<double> best = timer.Best(/*warmup=*/2, /*tries=*/10, [&]() -> absl::Status {
    TANDEM_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice, timer.stream()));
    return absl::OkStatus();
  });
  if (!best.ok()) {
    return best.status();
  }
  return static_cast<double>(bytes) / *best / 1e9;
}

absl::StatusOr<double> CudaMeasureGemmTflops(int device, int n) {
  if (n < 1 || n > 32768) {
    return absl::InvalidArgumentError(absl::StrCat("GEMM size ", n, " outside [1, 32768]"));
  }
  TANDEM_STATUS_RETURN_IF_ERROR(UseDevice(device));
  const size_t elems = static_cast<size_t>(n) * static_cast<size_t>(n);
  const size_t bytes = elems * sizeof(uint16_t);
  // A and B side by side in one host buffer, uniform in [-1, 1): realistic data, since zeros
  // draw less power and could let the clocks run higher than a real GEMM sees.
  std::vector<uint16_t> host(2 * elems);
  uint64_t state = 0x9E3779B97F4A7C15ull;
  for (uint16_t& v : host) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const float u = static_cast<float>(state >> 40) / static_cast<float>(uint64_t{1} << 24);
    v = F32ToBf16(2.0f * u - 1.0f);
  }
  DeviceBuffer ab;
  DeviceBuffer c;
  TANDEM_STATUS_RETURN_IF_ERROR(ab.Reserve(2 * bytes, "GEMM operands"));
  TANDEM_STATUS_RETURN_IF_ERROR(c.Reserve(bytes, "GEMM result"));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpy(ab.get(), host.data(), 2 * bytes, cudaMemcpyHostToDevice));
  // A pageable-memory cudaMemcpy may return before its DMA lands, and the timing stream does not
  // order after the legacy stream.
  TANDEM_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  host = {};
  const auto* a = ab.as<const uint16_t>();
  const auto* b = a + elems;

  Timer timer;
  TANDEM_STATUS_RETURN_IF_ERROR(timer.Init());
  CublasHandle cublas;
  TANDEM_STATUS_RETURN_IF_ERROR(cublas.Init(timer.stream()));
  const float alpha = 1.0f;
  const float beta = 0.0f;
  // Several GEMMs per timed run, so that one launch's overhead does not count against a large
  // product (the same as the PyTorch peer, bench/gpu/torch_peer.py).
  constexpr int kPerTry = 10;
  absl::StatusOr<double> best = timer.Best(/*warmup=*/3, /*tries=*/5, [&]() -> absl::Status {
    for (int i = 0; i < kPerTry; ++i) {
      TANDEM_CUBLAS_RETURN_IF_ERROR(cublasGemmEx(
          cublas.get(), CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a, CUDA_R_16BF, n, b,
          CUDA_R_16BF, n, &beta, c.get(), CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    return absl::OkStatus();
  });
  if (!best.ok()) {
    return best.status();
  }
  const double flops = 2.0 * static_cast<double>(n) * n * n * kPerTry;
  return flops / *best / 1e12;
}

}  // namespace tandem
