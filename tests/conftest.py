import os

# Nothing in the test suite may reach the Hub: fail fast instead of retrying a connection.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The fused Triton kernels run on CPU tensors in Triton's interpreter (CI has no GPU). Triton
# decides at import, so this must be set before anything imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(scope="session")
def python_docs() -> list[str]:
    """Local text that every Python ships: the pydoc topic pages (~460 kB)."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


@pytest.fixture(scope="session")
def trained_tiny(python_docs, tmp_path_factory):
    """A tiny PolyAttn model trained for a few seconds on the Python docs (a PretrainResult)."""
    from hf_polyattn.training.pretrain import pretrain

    return pretrain(
        python_docs,
        tmp_path_factory.mktemp("trained_tiny"),
        steps=150,
        vocab_size=512,
        block_size=64,
        batch_size=16,
        learning_rate=3e-3,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        progress=False,
    )
