import os

# The hub is unreachable here: make any attempt fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from interp.models import TINY_MODEL, load_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model():
    return load_model(TINY_MODEL)


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
