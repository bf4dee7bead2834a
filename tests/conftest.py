"""Shared test set-up: hypothesis profiles and where the real E2E files live.

No TIKTOKEN_CACHE_DIR here: lora_min ships GPT-2's BPE (lora_min/tokenizer.py), so the suite
tokenizes offline as a user's machine does; test_tokenizer.py points tiktoken at
../shared/tiktoken-cache itself for its reference Encoding."""
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Property tests run a modest number of examples by default so the suite stays
# fast on 2 CPU cores; `HYPOTHESIS_PROFILE=thorough pytest` runs many more.
settings.register_profile(
    "default", max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def real_e2e_dir() -> Path | None:
    """The folder with the official E2E CSVs, or None outside CI / the dev machine."""
    env = os.environ.get("LORA_MIN_E2E_DIR")
    for candidate in ([Path(env)] if env else []) + [SHARED / "e2e"]:
        if (candidate / "devset.csv").is_file():
            return candidate
    return None


@pytest.fixture
def e2e_dir() -> Path:
    path = real_e2e_dir()
    if path is None:
        pytest.skip("the real E2E CSVs are not here (set LORA_MIN_E2E_DIR or put ../shared/e2e beside the checkout)")
    return path


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside the checkout")
    return SHARED
