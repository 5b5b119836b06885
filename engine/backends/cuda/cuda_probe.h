// What one CUDA device can do, measured now: device-to-device copy bandwidth and bf16 GEMM
// throughput, the baselines the engine benchmark reports its roofline fraction and MFU against.
// No CUDA type appears in this header, so plain C++ tools can include it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace tandem {

struct CudaDeviceInfo {
  std::string name;
  int compute_capability_major = 0;
  int compute_capability_minor = 0;
  int sm_count = 0;
  int64_t total_memory_bytes = 0;
  // 2 (double data rate) x peak memory clock x bus width, in GB/s (1 GB = 1e9 B); 0 when the
  // driver does not report the clock.
  double theoretical_bandwidth_gbps = 0;
  int driver_version = 0;  // e.g. 13000 for 13.0
  int runtime_version = 0;
};

// FAILED_PRECONDITION when no CUDA device is present, INVALID_ARGUMENT for a device index out of
// range, INTERNAL for other CUDA failures. The same applies to the measurements below.
absl::StatusOr<CudaDeviceInfo> CudaDescribeDevice(int device);

// Copies a `bytes` buffer device to device (cudaMemcpyAsync, timed with CUDA events; best of
// several after a warm-up) and returns bytes / seconds / 1e9. Every copied byte is read once and
// written once, so the memory traffic is twice the returned figure; the returned figure is the
// read bandwidth the benchmarks divide weight bytes by. Needs 2 x `bytes` of free device memory
// (RESOURCE_EXHAUSTED otherwise).
absl::StatusOr<double> CudaMeasureCopyBandwidthGBps(int device, size_t bytes);

// cublasGemmEx of two n x n bf16 matrices into bf16 with fp32 compute (data uniform in [-1, 1]),
// timed with CUDA events, best of several after a warm-up; returns 2 n^3 / seconds / 1e12.
absl::StatusOr<double> CudaMeasureGemmTflops(int device, int n);

}  // namespace tandem
