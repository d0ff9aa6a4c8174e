import pytest

from model_setups import SETUPS


@pytest.fixture(params=SETUPS, ids=[s.name for s in SETUPS])
def setup(request):
    """Each registered model, skipped where the installed transformers cannot run it."""
    if request.param.skip:
        pytest.skip(request.param.skip)
    return request.param
