// Asks the CUDA runtime whether a device can run the kernels of this build, before any launch:
// vsops/backends.py then picks the Triton kernels for a GPU the build has no code for.
#include "cuda/launch.h"

namespace vsops {
namespace cuda {
namespace {

__global__ void probe_kernel() {}

}  // namespace

cudaError_t kernel_image_status(int device) {
  int current = 0;
  cudaError_t status = cudaGetDevice(&current);
  if (status != cudaSuccess) return status;
  status = cudaSetDevice(device);
  if (status == cudaSuccess) {
    // Loads the kernel's module for the device (compiling its PTX if that is all there is).
    cudaFuncAttributes attributes;
    status = cudaFuncGetAttributes(&attributes, probe_kernel);
  }
  cudaSetDevice(current);
  cudaGetLastError();
  return status;
}

}  // namespace cuda
}  // namespace vsops
