"""Triton kernels of the vsops operators (the GPU path when the compiled CUDA kernels are
absent; CI runs them on CPU tensors under ``TRITON_INTERPRET=1``)."""
