"""Lets the registry's torchvision (a CUDA build) import beside a CPU torch (2.13.0+cpu).

Its compiled ops need libtorch_cuda and do not load; its import then fails at two fake-kernel
registrations that, unlike the others, do not check whether the ops exist. Defining those two
schemas lets the import finish; torchvision's Python transforms (all transformers' video
processors use) work, and its compiled ops stay unavailable. .ci/run installs it into the vLLM
test environment as a .pth import, and loads it as a pytest plugin (``-p torchvision_cpu_shim``)
for the lmms-eval model's processor test; a machine that reaches PyTorch's CPU index installs
torchvision's CPU build instead (see docs/vllm.md).
"""
import torch

_LIBRARY = torch.library.Library("torchvision", "DEF")
_LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
