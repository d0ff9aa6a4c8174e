"""Tensor parallel serving with vsops' plugin: two ranks on this CPU (vLLM's multiprocessing
executor) select and generate as vsops' transformers integration does. Each rank runs the
selection on the full merged visual tokens vLLM's tower hands every rank."""
import pytest

pytest.importorskip("vllm")

import vllm_engine as serving  # noqa: E402  (sets vLLM's environment before vLLM is imported)
from vllm import LLM  # noqa: E402

from vsops.integrations.testing.checkpoint import write_tiny_checkpoint  # noqa: E402


def test_two_ranks_generate_as_the_transformers_integration(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "model", **serving.SIZES)
    llm = LLM(model=str(path), **serving.ENGINE, hf_overrides={"visionselector": {"budget": 0.5}},
              tensor_parallel_size=2, distributed_executor_backend="mp")
    serving.assert_same_generation(serving.vllm_greedy(llm), serving.transformers_greedy(path, 0.5))
