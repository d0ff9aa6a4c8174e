"""The environment vsops runs vLLM's CPU backend in (tests, ``vsops bench --op vllm``)."""
from __future__ import annotations

import os

__all__ = ["CPU_ENVIRONMENT", "use_cpu_environment"]

# Every endpoint on 127.0.0.1 (without VLLM_HOST_IP vLLM finds its address by routing towards a
# public resolver), no usage statistics, a 1 GiB KV cache, no thread pinning, the engine in the
# calling process (start-up in seconds rather than a minute, half the memory).
CPU_ENVIRONMENT = dict(VLLM_HOST_IP="127.0.0.1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
                       VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind", HF_HUB_OFFLINE="1",
                       VLLM_ENABLE_V1_MULTIPROCESSING="0")


def use_cpu_environment() -> dict:
    """Sets :data:`CPU_ENVIRONMENT` where the caller has not set a variable (before vLLM is
    imported: it reads them then); returns it."""
    for name, value in CPU_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    return CPU_ENVIRONMENT
