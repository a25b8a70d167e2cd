"""`notellm2.launcher.train.chunked.check_chunkable`: which runs may use train.chunk_pairs (the ZeRO stages whose chunked
step is tested, and models whose only dropout is keyed per note)."""
from __future__ import annotations

import pytest
import torch

from notellm2.launcher.train.chunked import check_chunkable
from notellm2.launcher.config import ConfigError
from notellm2.modeling.connector import DropoutKeys, KeyedDropout


class _Model(torch.nn.Module):
    def __init__(self, plain_p: float = 0.0, keyed_p: float = 0.1):
        super().__init__()
        self.q = KeyedDropout(keyed_p, DropoutKeys(), site=0) if keyed_p else torch.nn.Identity()
        self.head = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(plain_p))


def test_zero2_and_zero3_with_keyed_dropout_are_accepted():
    for stage in (2, 3):
        check_chunkable(_Model(), 2, stage)
    check_chunkable(_Model(plain_p=0.5), 0, 1)  # chunking off: nothing to check


@pytest.mark.parametrize("stage", [0, 1])
def test_untested_zero_stages_are_refused(stage):
    with pytest.raises(ConfigError, match=rf"^train\.chunk_pairs: 2 is supported with ZeRO-2 and ZeRO-3 .*stage {stage}"):
        check_chunkable(_Model(), 2, stage)


def test_dropout_outside_the_qformer_is_refused():
    with pytest.raises(ConfigError, match=r"head\.1 \(p=0\.5\)"):
        check_chunkable(_Model(plain_p=0.5), 2, 3)
