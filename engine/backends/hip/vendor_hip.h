// HIP side of the vendor layer: maps the CUDA runtime, intrinsics and (where ROCm ships it)
// cuBLAS names used by the CUDA backend onto HIP, so engine/backends/cuda/kernels.cu compiles
// unchanged with hipcc. Only what the backend uses is mapped; add names here, never in kernels.
#pragma once

#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>

#define TANDEM_GPU_VENDOR "hip"

// Runtime.
#define cudaError_t hipError_t
#define cudaSuccess hipSuccess
#define cudaErrorInvalidValue hipErrorInvalidValue
#define cudaGetLastError hipGetLastError
#define cudaPeekAtLastError hipPeekAtLastError
#define cudaGetErrorName hipGetErrorName
#define cudaGetErrorString hipGetErrorString
#define cudaStream_t hipStream_t
#define cudaEvent_t hipEvent_t
#define cudaStreamCreateWithFlags hipStreamCreateWithFlags
#define cudaStreamNonBlocking hipStreamNonBlocking
#define cudaStreamDestroy hipStreamDestroy
#define cudaStreamSynchronize hipStreamSynchronize
#define cudaDeviceSynchronize hipDeviceSynchronize
#define cudaEventCreateWithFlags hipEventCreateWithFlags
#define cudaEventDisableTiming hipEventDisableTiming
#define cudaEventRecord hipEventRecord
#define cudaEventSynchronize hipEventSynchronize
#define cudaEventDestroy hipEventDestroy
#define cudaMalloc hipMalloc
#define cudaFree hipFree
#define cudaMallocHost(ptr, size) hipHostMalloc((ptr), (size), hipHostMallocDefault)
#define cudaFreeHost hipHostFree
#define cudaMemcpy hipMemcpy
#define cudaMemcpyAsync hipMemcpyAsync
#define cudaMemset hipMemset
#define cudaMemsetAsync hipMemsetAsync
#define cudaMemcpyHostToDevice hipMemcpyHostToDevice
#define cudaMemcpyDeviceToHost hipMemcpyDeviceToHost
#define cudaMemcpyDeviceToDevice hipMemcpyDeviceToDevice
#define cudaMemGetInfo hipMemGetInfo
#define cudaGetDeviceCount hipGetDeviceCount
#define cudaSetDevice hipSetDevice
#define cudaGetDevice hipGetDevice
#define cudaDeviceGetAttribute hipDeviceGetAttribute
#define cudaDevAttrMultiProcessorCount hipDeviceAttributeMultiprocessorCount

// Warp intrinsics. HIP before ROCm 6.2 has no *_sync variants; the kernels use logical 32-lane
// warps and always pass width 32, so on 64-wide wavefronts each half behaves as one warp.
#define __shfl_xor_sync(mask, var, lane_mask, width) \
  ((void)(mask), __shfl_xor((var), (lane_mask), (width)))
#define __shfl_sync(mask, var, src_lane, width) ((void)(mask), __shfl((var), (src_lane), (width)))

// cuBLAS -> hipBLAS, for the host side of a HIP backend where ROCm provides hipBLAS (Debian 12
// does not, so only the kernels are built there).
#if __has_include(<hipblas/hipblas.h>)
#include <hipblas/hipblas.h>
#define TANDEM_HAVE_HIPBLAS 1
#define cublasHandle_t hipblasHandle_t
#define cublasStatus_t hipblasStatus_t
#define CUBLAS_STATUS_SUCCESS HIPBLAS_STATUS_SUCCESS
#define cublasCreate hipblasCreate
#define cublasDestroy hipblasDestroy
#define cublasSetStream hipblasSetStream
#define cublasGemmEx hipblasGemmEx
#define CUBLAS_OP_N HIPBLAS_OP_N
#define CUBLAS_OP_T HIPBLAS_OP_T
#define CUBLAS_GEMM_DEFAULT HIPBLAS_GEMM_DEFAULT
#define CUDA_R_32F HIPBLAS_R_32F
#define CUDA_R_16F HIPBLAS_R_16F
#define CUDA_R_16BF HIPBLAS_R_16B
#define CUBLAS_COMPUTE_32F HIPBLAS_R_32F
#endif
