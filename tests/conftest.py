"""Fixtures every test folder can use: session-wide tiny models, built once per session, offline
(builders in tests/helpers/models.py)."""
import pytest

from tests.helpers import models as fixtures
@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "tokenizer": fixtures.make_tokenizer(root),
        "llama": fixtures.make_tiny_llm_dir(root, arch="llama"),
        "qwen2": fixtures.make_tiny_llm_dir(root, arch="qwen2"),
        "clip": fixtures.make_tiny_clip_dir(root),
        "clip_vision": fixtures.make_tiny_clip_dir(root, vision_only=True),
        "siglip": fixtures.make_tiny_siglip_dir(root),
        "siglip_vision": fixtures.make_tiny_siglip_dir(root, vision_only=True),
    }


@pytest.fixture(scope="session")
def llama_tok(tiny):
    from notellm2.modeling.backbone import load_tokenizer
    return load_tokenizer(tiny["llama"])


@pytest.fixture(scope="session")
def qwen_tok(tiny):
    from notellm2.modeling.backbone import load_tokenizer
    return load_tokenizer(tiny["qwen2"])
