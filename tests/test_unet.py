"""The skeleton `ImageUNet` and `VideoUNet` share (backbones/unet.py): the checks of their common
config fields, for both configs, and folding positional dims into the batch and back."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backbones import ImageUNetConfig, VideoUNetConfig
from backbones.unet import fold, unfold

# fields of UNetConfig -> what the ValueError says; every entry is wrong for both configs' defaults
BAD_FIELDS = [
    ({"base_channels": 24, "groups": 32}, "not divisible by groups"),
    ({"num_classes": 10, "context_dim": 8}, "exclusive"),
    ({"num_res_blocks": -1}, "num_res_blocks must be a positive int"),
    ({"num_res_blocks": 0}, "num_res_blocks must be a positive int"),
    ({"base_channels": 0}, "base_channels"),
    ({"in_channels": 1.0}, "in_channels"),
    ({"channel_mult": ()}, "channel_mult"),
    ({"channel_mult": (1, -2, 2)}, "channel_mult"),
    ({"attention_levels": (4,)}, "attention_levels"),
    ({"head_dim": 32, "num_heads": 4}, "exactly one"),
    ({"head_dim": 48}, "head_dim=48"),
    ({"head_dim": None, "num_heads": 3}, "num_heads=3"),
    ({"dropout": 1.5}, "dropout"),
    ({"dropout": -0.1}, "dropout"),
    ({"num_classes": 0}, "num_classes"),
    ({"context_dim": -4}, "context_dim"),
    ({"attention_backend": "flash"}, "attention_backend"),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
]


@pytest.mark.parametrize("config", [ImageUNetConfig, VideoUNetConfig])
@pytest.mark.parametrize("fields,match", BAD_FIELDS)
def test_bad_fields_raise_naming_the_config(config, fields, match):
    with pytest.raises(ValueError, match=match) as e:
        config(**fields)
    assert config.__name__ in str(e.value)


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(1, 3), min_size=0, max_size=2), spatial=st.integers(1, 2), n=st.integers(1, 3))
def test_unfold_inverts_fold_and_keeps_each_sample_together(sizes, spatial, n):
    x = torch.randn(n, 2, *sizes, *[3] * spatial)
    folded = fold(x, len(sizes))
    assert folded.shape == (n * (torch.tensor(sizes).prod().item() if sizes else 1), 2, *[3] * spatial)
    assert torch.equal(unfold(folded, tuple(sizes)), x)
    # sample-major: the first prod(sizes) rows are sample 0's positions, in order
    if sizes:
        assert torch.equal(folded[0], x[(0, slice(None), *[0] * len(sizes))])
        assert torch.equal(folded[: folded.shape[0] // n], fold(x[:1], len(sizes)))
    else:
        assert folded is x
