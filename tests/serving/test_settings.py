"""The vLLM plugin's settings (vsops.vllm.settings) refuse what it cannot serve; needs no vLLM."""
from types import SimpleNamespace

import pytest

from vsops.vllm.settings import settings_of


@pytest.mark.parametrize("method", ["fastv", "pdrop", "dart"])
def test_methods_inside_the_language_model_are_refused(method):
    with pytest.raises(ValueError, match=f"visionselector.method '{method}' drops tokens inside the language model"):
        settings_of(SimpleNamespace(visionselector={"budget": 0.5, "method": method}))


@pytest.mark.parametrize("method", ["holov", "prumerge_plus", "visionzip"])
def test_methods_reading_the_vision_tower_are_refused(method):
    with pytest.raises(ValueError, match="reads the vision tower's attention"):
        settings_of(SimpleNamespace(visionselector={"budget": 0.5, "method": method}))


def test_a_vision_stage_method_is_served():
    settings = settings_of(SimpleNamespace(visionselector={"budget": 0.5, "method": "divprune"}))
    assert settings.budget == 0.5 and settings.method == "divprune"
