"""The ops as torch.ops.vsops.*: opcheck (schema, fake kernel, autograd registration) and
torch.compile without graph breaks."""
import pytest
import torch

from vsops.difftopk import DiffTopK, difftopk, topk_mask
from vsops.ops import difftopk as ops


def _samples(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    padded = torch.randn(3, 17, generator=g).to(device=device, dtype=dtype)
    flat = torch.randn(20, generator=g).to(device=device, dtype=dtype)
    cu = torch.tensor([0, 5, 5, 20], dtype=torch.int32, device=device)
    return [
        (padded, torch.tensor([0, 4, 17], device=device), None),
        (flat, torch.tensor([2, 0, 7], device=device), cu),
    ]


def test_every_backend_is_registered():
    for operator in (ops.forward, ops.backward, ops.topk_mask):
        for name in operator.op_names():
            assert hasattr(torch.ops.vsops, name), name
    assert {"reference", "triton"} <= set(ops.forward.backends())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(backend, dtype):
    name, device = backend
    if name == "triton" and (dtype == torch.float64 or device.type == "cpu"):
        pytest.skip("Triton serves fp16/bf16/fp32; the interpreter is too slow for opcheck's repeats")
    for scores, k, cu in _samples(device, dtype):
        torch.library.opcheck(ops.forward.op(name), (scores.requires_grad_(True), k, cu))
        mask, state = ops.forward.op(name)(scores.detach(), k, cu)
        torch.library.opcheck(ops.backward.op(name), (torch.randn_like(mask), scores.detach(), state, cu))
        torch.library.opcheck(ops.topk_mask.op(name), (scores.detach(), k, cu))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_reference(dtype):
    for scores, k, cu in _samples("cpu", dtype):
        torch.library.opcheck(ops.forward.op("reference"), (scores.requires_grad_(True), k, cu))
        mask, state = ops.forward.op("reference")(scores.detach(), k, cu)
        torch.library.opcheck(ops.backward.op("reference"), (torch.randn_like(mask), scores.detach(), state, cu))
        torch.library.opcheck(ops.topk_mask.op("reference"), (scores.detach(), k, cu))


def test_torch_compile_fullgraph(backend):
    name, device = backend
    if name == "triton" and device.type == "cpu":
        pytest.skip("compiling for the Triton interpreter is not supported")
    torch._dynamo.reset()
    scores, k, cu = _samples(device)[1]

    def step(x, k, cu):
        soft = difftopk(x, k, cu_seqlens=cu)
        hard = topk_mask(x, k, cu_seqlens=cu)
        return (soft * hard).sum() + soft.pow(2).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = scores.clone().requires_grad_(True)
    out = compiled(x, k, cu)
    out.backward()
    x_eager = scores.clone().requires_grad_(True)
    step(x_eager, k, cu).backward()
    torch.testing.assert_close(out, step(scores, k, cu))
    torch.testing.assert_close(x.grad, x_eager.grad)


def test_torch_compile_module_inductor():
    torch._dynamo.reset()
    module = DiffTopK(0.25)
    scores = torch.randn(4, 64, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True)
    soft = compiled(scores)
    torch.testing.assert_close(soft, module(scores))
    module.eval()
    torch.testing.assert_close(torch.compile(module, fullgraph=True)(scores), module(scores))


def _cpp_schemas() -> dict[str, str]:
    """The schemas of python_bindings/ops.cpp's ``m.def("...")`` calls (adjacent string
    literals joined), by op name."""
    import pathlib
    import re

    source = (pathlib.Path(__file__).parents[2] / "python_bindings" / "ops.cpp").read_text()
    defs = ["".join(re.findall(r'"([^"]*)"', call)) for call in re.findall(r"m\.def\((.*?)\);", source, re.S)]
    return {schema.split("(", 1)[0]: schema for schema in defs}


def test_the_python_schemas_match_the_compiled_ones():
    """Each schema is written twice, in python_bindings/ops.cpp (the compiled ops) and in
    vsops/ops/*.py (the reference and Triton ops, and what their fake kernels take): both must
    declare the same ops with the same arguments and returns."""
    from vsops.ops import attention_received, divprune, lis, registry, varlen  # noqa: F401  (registers them)

    declared = {o.name: torch._C.parse_schema(f"vsops::{o.name}{o.schema}") for o in registry.OPERATORS}
    written = {name: torch._C.parse_schema(f"vsops::{schema}") for name, schema in _cpp_schemas().items()}
    assert sorted(declared) == sorted(written)
    for name, schema in declared.items():
        assert str(schema) == str(written[name]), name
        if hasattr(torch.ops.vsops, name):  # vsops._C built: the schema it registered
            assert str(schema) == str(getattr(torch.ops.vsops, name).default._schema), name
