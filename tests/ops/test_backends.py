"""Backend choice for a GPU the compiled CUDA kernels have no code for, simulated on the CPU: the
calls go to Triton (the reference where Triton cannot serve them), with one warning per GPU;
forcing the CUDA backend there names the reason. Also the nvcc flags of setup.py."""
import importlib.util
import pathlib
import warnings

import pytest
import torch

from vsops import backends

NO_IMAGE = "no kernel image is available for execution on the device"


@pytest.fixture
def gpu_without_kernel_image(monkeypatch):
    """A process with a CUDA build and Triton where GPU 0 cannot run the compiled kernels and
    GPU 1 can; returns the probe's calls."""
    monkeypatch.setattr(backends, "_COMPILED_CUDA", True)
    monkeypatch.setattr(backends, "_CUDA_DEVICE", True)
    monkeypatch.setattr(backends, "_TRITON_IMPORTABLE", True)
    monkeypatch.setattr(backends, "_CUDA_KERNELS_RUN", {})
    monkeypatch.delenv("VSOPS_BACKEND", raising=False)
    calls = []

    def probe(index):
        calls.append(index)
        return NO_IMAGE if index == 0 else None

    monkeypatch.setattr(backends, "_cuda_kernel_error", probe)
    return calls


def test_a_gpu_without_kernel_image_uses_triton_with_one_warning(gpu_without_kernel_image):
    gpu0 = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match=f"cannot run on cuda:0: {NO_IMAGE}.*Triton") as caught:
        assert backends.select(gpu0, torch.float16) == "triton"
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, and no second probe
        assert backends.select(gpu0, torch.float32) == "triton"
        assert backends.select_implemented(gpu0, torch.float32, ["cuda", "triton", "reference"]) == "triton"
        # float64 is not Triton's: the reference, as on a GPU with no Triton.
        assert backends.select(gpu0, torch.float64) == "reference"
        assert backends.select(torch.device("cuda", 1), torch.float32) == "cuda"
    assert gpu_without_kernel_image == [0, 1]


def test_forcing_cuda_on_such_a_gpu_says_why(gpu_without_kernel_image, monkeypatch):
    monkeypatch.setenv("VSOPS_BACKEND", "cuda")
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="no code for this GPU"):
        backends.select(torch.device("cuda", 0), torch.float32)
    assert backends.select(torch.device("cuda", 1), torch.float32) == "cuda"


def test_the_choice_traces_under_torch_compile(gpu_without_kernel_image):
    def step(x):
        backend = backends.select(torch.device("cuda", 0), torch.float32)
        return x + 1 if backend == "triton" else x - 1

    with pytest.warns(RuntimeWarning, match="cannot run on cuda:0"):
        out = torch.compile(step, fullgraph=True, backend="eager")(torch.zeros(3))
    assert torch.equal(out, torch.ones(3))


@pytest.mark.skipif(not backends.available()["cuda"], reason="needs a CUDA build and a GPU")
def test_the_compiled_kernels_run_on_this_gpu():
    assert backends._cuda_kernel_error(torch.cuda.current_device()) is None


def _setup_module():
    path = pathlib.Path(__file__).resolve().parents[2] / "setup.py"
    spec = importlib.util.spec_from_file_location("vsops_setup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # builds nothing when imported
    return module


def test_nvcc_flags_embed_the_ptx_of_the_newest_arch(monkeypatch):
    setup = _setup_module()
    monkeypatch.setenv("VSOPS_CUDA_ARCHS", "90,80")
    assert setup._cuda_gencode_flags() == [
        "-gencode", "arch=compute_80,code=sm_80",
        "-gencode", "arch=compute_90,code=sm_90",
        "-gencode", "arch=compute_90,code=compute_90",
    ]
    monkeypatch.setenv("VSOPS_CUDA_ARCHS", "sm_90")
    with pytest.raises(ValueError, match="VSOPS_CUDA_ARCHS"):
        setup._cuda_gencode_flags()
