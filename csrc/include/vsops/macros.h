// Qualifiers that let one function body compile for the host (g++) and the device (nvcc).
#pragma once

#if defined(__CUDACC__)
#define VSOPS_HD __host__ __device__ __forceinline__
#else
#define VSOPS_HD inline
#endif
