// The vsops operator library: schemas and CPU kernels. CUDA kernels register in
// cuda_ops.cpp (CUDA builds only); fake (meta) kernels and autograd are registered from
// Python in vsops/ops/.
#include <torch/library.h>

#include "cpu/kernels.h"

TORCH_LIBRARY(vsops, m) {
  m.def("difftopk_forward(Tensor scores, Tensor k, Tensor? cu_seqlens) -> (Tensor, Tensor)");
  m.def(
      "difftopk_backward(Tensor grad, Tensor scores, Tensor row_state, Tensor? cu_seqlens) "
      "-> Tensor");
  m.def("topk_mask(Tensor scores, Tensor k, Tensor? cu_seqlens) -> Tensor");
  m.def("lis_segment_sum(Tensor x, Tensor? token_weight, Tensor? cu_seqlens) -> Tensor");
  m.def("lis_segment_dot(Tensor x, Tensor u, Tensor c, Tensor? cu_seqlens) -> Tensor");
  m.def("lis_weight_product(Tensor vectors, Tensor weight, bool transpose) -> Tensor");
  m.def("lis_weight_grad(Tensor left, Tensor right, ScalarType dtype) -> Tensor");
  m.def("lis_input_grad(Tensor grad, Tensor u, Tensor w, Tensor? cu_seqlens, ScalarType dtype) -> Tensor");
  m.def("varlen_pack(Tensor keep, SymInt total, Tensor[] rows) -> (Tensor, Tensor[])");
  m.def("varlen_unpack(Tensor packed, Tensor indices, SymInt rows, Scalar fill) -> Tensor");
  m.def("divprune_keep(Tensor x, Tensor k, Tensor cu_seqlens) -> Tensor");
  m.def(
      "attention_received(Tensor q, Tensor k, Tensor cu_seqlens_q, Tensor cu_seqlens_k, float scale) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(vsops, CPU, m) {
  m.impl("difftopk_forward", &vsops::cpu::difftopk_forward);
  m.impl("difftopk_backward", &vsops::cpu::difftopk_backward);
  m.impl("topk_mask", &vsops::cpu::topk_mask);
  m.impl("lis_segment_sum", &vsops::cpu::lis_segment_sum);
  m.impl("lis_segment_dot", &vsops::cpu::lis_segment_dot);
  m.impl("lis_weight_product", &vsops::cpu::lis_weight_product);
  m.impl("lis_weight_grad", &vsops::cpu::lis_weight_grad);
  m.impl("lis_input_grad", &vsops::cpu::lis_input_grad);
  m.impl("varlen_pack", &vsops::cpu::varlen_pack);
  m.impl("varlen_unpack", &vsops::cpu::varlen_unpack);
  m.impl("divprune_keep", &vsops::cpu::divprune_keep);
  m.impl("attention_received", &vsops::cpu::attention_received);
}
