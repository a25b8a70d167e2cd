"""The reader with the real prompter (notellm2.modeling.prompts.NotePrompter) in loader workers: the note dict
it hands to encode_fn is what the prompter accepts, and the prompter's has_image is kept."""
from __future__ import annotations

import pytest
import torch

from notellm2.data_shards.config import DataConfig
from notellm2.data_shards.reader import PairLoader
from tests.helpers import models as fixtures
from tests.helpers.shards import write_pair_shards


@pytest.mark.parametrize("variant,image_tokens", [("notellm2", 4), ("text_only", 0)])
def test_pair_batches_through_the_real_prompter(tmp_path, variant, image_tokens):
    from notellm2.modeling.backbone import load_tokenizer
    from notellm2.modeling.prompts import NotePrompter

    tok = load_tokenizer(fixtures.make_tiny_llm_dir(tmp_path / "llm", arch="llama"))
    prompter = NotePrompter(tok, variant, max_text_tokens=16, num_image_tokens=image_tokens)
    write_pair_shards(str(tmp_path / "shards"), [8, 8])
    loader = PairLoader(str(tmp_path / "shards" / "pairs-train-*.tar"),
                        data_cfg=DataConfig(num_workers=2, shuffle_buffer=4), encode_fn=prompter.encode,
                        collate_text_fn=prompter.collate, rank=0, world_size=1, pairs_per_rank=4, image_size=32)
    batches = list(loader)
    assert len(batches) == 4
    for b in batches:
        assert b["input_ids"].shape[0] == 8 and b["attention_mask"].shape == b["input_ids"].shape
        assert "last_pos" in b  # the prompter's own keys come through
        if variant == "text_only":
            assert not b["has_image"].any()
        else:
            assert torch.equal(b["has_image"], b["image_present"])
    assert any((~b["image_present"]).any() for b in batches)  # queries q3 and q10 have no image
