// CUDA side of the vendor layer: the kernels in kernels.cu are written against CUDA names; this
// header brings them in. engine/backends/hip/vendor_hip.h maps the same names onto HIP.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define TANDEM_GPU_VENDOR "cuda"
