// Host-side helpers of the CUDA backend: CUDA/cuBLAS errors as absl::Status, and owning device
// and pinned host buffers. Internal to engine/backends/cuda.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace tandem::cuda_internal {

inline absl::Status CudaError(cudaError_t err, const char* what) {
  return absl::InternalError(
      absl::StrCat("CUDA error in ", what, ": ", cudaGetErrorName(err), " (",
                   cudaGetErrorString(err), ")"));
}

inline absl::Status CublasError(cublasStatus_t st, const char* what) {
  return absl::InternalError(absl::StrCat("cuBLAS error in ", what, ": ", cublasGetStatusName(st),
                                          " (", cublasGetStatusString(st), ")"));
}

// Out-of-memory is an environment condition the caller may act on (smaller pool, fewer
// sequences), so it maps to RESOURCE_EXHAUSTED rather than INTERNAL.
inline absl::Status AllocError(cudaError_t err, size_t bytes, const char* what) {
  if (err == cudaErrorMemoryAllocation) {
    return absl::ResourceExhaustedError(
        absl::StrCat("out of device or pinned memory allocating ", bytes, " bytes for ", what));
  }
  return CudaError(err, what);
}

}  // namespace tandem::cuda_internal

#define TANDEM_CUDA_RETURN_IF_ERROR(expr)                                 \
  do {                                                                    \
    const cudaError_t tandem_cuda_err_ = (expr);                          \
    if (tandem_cuda_err_ != cudaSuccess) {                                \
      return ::tandem::cuda_internal::CudaError(tandem_cuda_err_, #expr); \
    }                                                                     \
  } while (0)

#define TANDEM_CUBLAS_RETURN_IF_ERROR(expr)                                  \
  do {                                                                       \
    const cublasStatus_t tandem_cublas_st_ = (expr);                         \
    if (tandem_cublas_st_ != CUBLAS_STATUS_SUCCESS) {                        \
      return ::tandem::cuda_internal::CublasError(tandem_cublas_st_, #expr); \
    }                                                                        \
  } while (0)

#define TANDEM_STATUS_RETURN_IF_ERROR(expr)      \
  do {                                           \
    absl::Status tandem_status_ = (expr);        \
    if (!tandem_status_.ok()) {                  \
      return tandem_status_;                     \
    }                                            \
  } while (0)

namespace tandem::cuda_internal {

// Device memory that grows on demand (Reserve never shrinks and does not keep contents).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      Free();
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  ~DeviceBuffer() { Free(); }

  absl::Status Reserve(size_t bytes, const char* what) {
    if (bytes <= bytes_) {
      return absl::OkStatus();
    }
    Free();
    void* p = nullptr;
    if (cudaError_t err = cudaMalloc(&p, bytes); err != cudaSuccess) {
      cudaGetLastError();  // clear the (non-sticky) allocation error
      return AllocError(err, bytes, what);
    }
    ptr_ = p;
    bytes_ = bytes;
    return absl::OkStatus();
  }

  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void Free() {
    if (ptr_ != nullptr) {
      cudaFree(ptr_);  // errors here are sticky context errors already reported elsewhere
      ptr_ = nullptr;
      bytes_ = 0;
    }
  }

  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Page-locked host memory (staging for async copies); grows on demand like DeviceBuffer.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() { Free(); }

  absl::Status Reserve(size_t bytes, const char* what) {
    if (bytes <= bytes_) {
      return absl::OkStatus();
    }
    Free();
    void* p = nullptr;
    if (cudaError_t err = cudaMallocHost(&p, bytes); err != cudaSuccess) {
      cudaGetLastError();
      return AllocError(err, bytes, what);
    }
    ptr_ = p;
    bytes_ = bytes;
    return absl::OkStatus();
  }

  void* get() const { return ptr_; }
  std::byte* bytes_ptr() const { return static_cast<std::byte*>(ptr_); }
  size_t bytes() const { return bytes_; }

 private:
  void Free() {
    if (ptr_ != nullptr) {
      cudaFreeHost(ptr_);
      ptr_ = nullptr;
      bytes_ = 0;
    }
  }

  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace tandem::cuda_internal
