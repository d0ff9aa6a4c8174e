import os

import torch

# Without a GPU the Triton kernels run under the interpreter (CPU tensors, fp32); it must be
# switched on before any Triton kernel is defined, i.e. before vsops.triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vsops import backends  # noqa: E402

# The benchmarks run only when named: untimed on CPU they take longer than the rest of the suite.
# `python -m pytest -q tests/bench --benchmark-disable` runs each once, `--benchmark-only` times them.
collect_ignore = ["bench"]

try:
    from hypothesis import settings
except ImportError:  # only tests/ops/test_properties.py needs it (the "test" extra installs it)
    pass
else:
    # Deterministic in CI (the same examples every run, no example database), and quick.
    settings.register_profile("vsops", max_examples=50, deadline=None, derandomize=True, database=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "vsops"))


def _compiled_backends():
    """(backend, device) pairs this machine can run, besides the reference."""
    pairs = []
    have = backends.available()
    if have["cpu"]:
        pairs.append(("cpu", "cpu"))
    if have["cuda"]:
        pairs.append(("cuda", "cuda"))
    if have["triton"]:
        pairs.append(("triton", "cuda" if torch.cuda.is_available() else "cpu"))
    return pairs


BACKEND_DEVICES = _compiled_backends()


@pytest.fixture(params=BACKEND_DEVICES, ids=[f"{b}-{d}" for b, d in BACKEND_DEVICES])
def backend(request, monkeypatch):
    """Forces one backend for the test; yields (backend, device)."""
    name, device = request.param
    monkeypatch.setenv("VSOPS_BACKEND", name)
    return name, torch.device(device)


def pytest_report_header(config):
    return f"vsops backends under test: {BACKEND_DEVICES} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')})"
