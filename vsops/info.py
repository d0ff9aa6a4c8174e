"""What this installation of vsops can run: ``vsops.info()`` and ``vsops info``."""
from __future__ import annotations

import sys
from typing import TextIO

import torch

from vsops import backends


def info(file: TextIO | None = sys.stdout) -> dict:
    """Reports the vsops and torch versions, the backends built or importable, and the
    backend each device uses (for float32 inputs). Prints the report to ``file`` (pass None
    to only return it) and returns it as a dict."""
    from vsops import __version__

    have = backends.available()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {
        "vsops": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "compiled_extension": backends.compiled_extension() is not None,
        "compiled_cuda_kernels": bool(
            backends.compiled_extension() is not None and backends.compiled_extension().built_with_cuda()
        ),
        "backends_available": have,
        "device_backend": {d: backends.select(torch.device(d), torch.float32) for d in devices},
    }
    if backends.compiled_error() is not None:
        report["compiled_extension_error"] = backends.compiled_error()
    if file is not None:
        width = max(len(key) for key in report)
        for key, value in report.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            print(f"{key:<{width}}  {value}", file=file)
    return report
