"""Registers one operator's backends as ``torch.ops.vsops.*`` with shared fake kernels and
autograd, and picks the backend per call.

The compiled ops (schemas in python_bindings/ops.cpp, kernels for CPU and CUDA) are
``torch.ops.vsops.<name>``; the Triton and reference implementations are registered here
as ``torch.ops.vsops.<name>_triton`` and ``<name>_reference`` with the same schema, so every
backend is opaque to ``torch.compile``, passes ``torch.library.opcheck`` and differentiates
through the same autograd formula.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from vsops import backends
from vsops.ops import validation

LIBRARY = torch.library.Library("vsops", "FRAGMENT")

# Every Operator, in the order of registration (the schema-agreement test walks them).
OPERATORS: list["Operator"] = []


def _op_name(name: str, backend: str) -> str:
    return name if backend in ("cpu", "cuda") else f"{name}_{backend}"


class Operator:
    """One operator: its schema, fake kernel and Python backends (triton, reference)."""

    def __init__(self, name: str, schema: str, fake: Callable, python_backends: dict[str, Callable]):
        self.name = name
        self.schema = schema
        self.argument_names = [a.name for a in torch._C.parse_schema(f"vsops::{name}{schema}").arguments]
        self._python_backends = dict(python_backends)
        for backend, impl in self._python_backends.items():
            op_name = _op_name(name, backend)
            LIBRARY.define(op_name + schema)
            LIBRARY.impl(op_name, self._checked(op_name, impl, backend), "CompositeExplicitAutograd")
        for op_name in self.op_names():
            torch.library.register_fake(f"vsops::{op_name}", self._checked(op_name, fake), lib=LIBRARY)
        OPERATORS.append(self)

    def _checked(self, op_name: str, fn: Callable, backend: str | None = None) -> Callable:
        """``fn`` behind the device check of its tensor arguments; a Triton backend also
        refuses tensors it cannot run (CPU ones without the interpreter)."""
        qualified = f"vsops::{op_name}"

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            values = [*args, *(kwargs.get(n) for n in self.argument_names[len(args):])]
            device = validation.check_op_devices(qualified, self.argument_names, values)
            if backend == "triton" and device is not None and not backends.triton_runs_on(device):
                raise ValueError(
                    f"{qualified}: {self.argument_names[0]} is on {device}; Triton kernels run CUDA "
                    "tensors (CPU tensors only under TRITON_INTERPRET=1)"
                )
            return fn(*args, **kwargs)

        return checked

    def qualified_name(self, backend: str) -> str:
        return f"vsops::{_op_name(self.name, backend)}"

    def op_names(self) -> list[str]:
        """Names of the registered ops (the compiled one only when vsops._C was built)."""
        return [_op_name(self.name, b) for b in self.backends()]

    def op(self, backend: str):
        return getattr(torch.ops.vsops, _op_name(self.name, backend))

    def backends(self) -> list[str]:
        """One backend name per registered op ("cpu" standing for the compiled op)."""
        names = list(self._python_backends)
        if backends.compiled_extension() is not None:
            names.append("cpu")
        return names

    def implemented(self) -> list[str]:
        """The backends with this op here: the Python ones, the compiled one for CPU tensors
        ("cpu") and, in a CUDA build, for CUDA tensors ("cuda"); for
        :func:`vsops.backends.select_implemented`."""
        names = self.backends()
        return names + ["cuda"] if backends.available()["cuda"] else names

    def __call__(self, *args, backend: str | None = None):
        """Runs the op on the backend chosen for the first argument's device and dtype."""
        first = args[0]
        backend = backend or backends.select(first.device, first.dtype)
        return self.op(backend)(*args)
