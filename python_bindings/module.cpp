// The importable vsops._C module. Importing it runs the static TORCH_LIBRARY registrations;
// its functions tell Python which kernels were compiled in, and whether a GPU can run them.
#include <Python.h>

#ifdef VSOPS_WITH_CUDA
#include "cuda/launch.h"
#endif

namespace {

PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef VSOPS_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

// None when GPU `device` can run the compiled CUDA kernels, else the CUDA runtime's reason.
PyObject* cuda_kernel_error(PyObject*, PyObject* arg) {
  const long device = PyLong_AsLong(arg);
  if (device == -1 && PyErr_Occurred()) return nullptr;
#ifdef VSOPS_WITH_CUDA
  const cudaError_t status = vsops::cuda::kernel_image_status(static_cast<int>(device));
  if (status != cudaSuccess) return PyUnicode_FromString(cudaGetErrorString(status));
  Py_RETURN_NONE;
#else
  return PyUnicode_FromString("vsops was built without CUDA kernels");
#endif
}

PyMethodDef methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled."},
    {"cuda_kernel_error", cuda_kernel_error, METH_O,
     "None when the GPU of this index can run the compiled CUDA kernels, else why not."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
