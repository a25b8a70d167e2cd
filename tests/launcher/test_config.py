"""The config schema: YAML + dotted overrides, and errors that name the key, value and what is allowed."""
import glob
import json
import os
import subprocess
import sys

import pytest
import yaml

from notellm2.launcher.config import (ConfigError, RunConfig, config_hash, load_config, parse_override,
                             save_resolved)

from tests.helpers.paths import REPO
def write_yaml(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_yaml_and_overrides_fill_the_schema_with_types(tmp_path):
    path = write_yaml(tmp_path, {"model": {"variant": "micl", "llm": {"num_layers": 4}}, "train": {"lr_llm": 1e-5}})
    cfg = load_config(path, ["train.max_steps=7", "train.lr_new=2e-4", "data.resampled=true",
                             "model.llm.num_layers=null", "eval.k_values=[5, 50]", "name=run a"])
    assert isinstance(cfg, RunConfig)
    assert cfg.model.variant == "micl"
    assert cfg.model.llm.num_layers is None  # override wins over the YAML
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.lr_new == pytest.approx(2e-4) and isinstance(cfg.train.lr_new, float)
    assert cfg.train.lr_llm == pytest.approx(1e-5)
    assert cfg.data.resampled is True
    assert cfg.eval.k_values == [5, 50]
    assert cfg.name == "run a"
    # untouched keys keep their defaults
    assert cfg.loss.init_scale == 20.0 and cfg.loss.max_scale == 100.0


def test_int_is_accepted_where_a_float_is_expected():
    assert load_config(None, ["train.lr_llm=1"]).train.lr_llm == 1.0


@pytest.mark.parametrize("override, key, fragment", [
    ("model.llm.num_layerz=4", "model.llm.num_layerz", "unknown key; allowed keys here: attn_implementation"),
    ("trian.max_steps=4", "trian", "unknown key; allowed keys here: checkpoint, data, eval"),
    ("train.max_steps=ten", "train.max_steps", "got 'ten' (str); allowed: an integer"),
    ("train.max_steps=2.5", "train.max_steps", "allowed: an integer"),
    ("train.lr_llm=fast", "train.lr_llm", "got 'fast' (str); allowed: a number"),
    ("data.resampled=1", "data.resampled", "allowed: true or false"),
    ("model.variant=clip", "model.variant", "allowed: one of 'text_only', 'basic_mm', 'micl'"),
    ("train.max_steps=0", "train.max_steps", "got 0; allowed: an integer > 0"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio", "got 1.5; allowed: a number in [0, 1]"),
    ("eval.k_values=[10, x]", "eval.k_values[1]", "allowed: an integer"),
    ("model.llm=3", "model.llm", "allowed: a mapping"),
    ("loss.init_scale=200", "loss.init_scale", "<= loss.max_scale"),
    ("model.vision.cls_source=cls", "model.vision.cls_source", "allowed: one of 'pooled', 'pre_layernorm'"),
    ("model.connector.ffn_size=0", "model.connector.ffn_size", "got 0; allowed: null or an integer > 0"),
    ("model.connector.ffn_size=wide", "model.connector.ffn_size", "allowed: an integer or null"),
    ("model.connector.dropout=1.0", "model.connector.dropout", "got 1.0; allowed: a number in [0, 1)"),
    ("model.connector.dropout=-0.1", "model.connector.dropout", "allowed: a number in [0, 1)"),
    ("model.fusion.bias=maybe", "model.fusion.bias", "allowed: true or false"),
    ("model.fusion.init=kaiming", "model.fusion.init", "allowed: one of 'default', 'xavier_normal', 'normal'"),
    ("model.fusion.init_std=0", "model.fusion.init_std", "got 0.0; allowed: a number > 0"),
    ("model.head.bias=1", "model.head.bias", "allowed: true or false"),
    ("model.head.init=xavier", "model.head.init", "allowed: one of 'default', 'xavier_normal', 'normal'"),
    ("model.head.init_std=-1", "model.head.init_std", "allowed: a number > 0"),
    ("model.head.gain=2", "model.head.gain", "unknown key; allowed keys here: bias, init, init_std"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio", "got 1.5; allowed: null or a number in [0, 1]"),
    ("train.warmup_ratio=some", "train.warmup_ratio", "allowed: a number or null"),
])
def test_bad_values_name_the_dotted_key_value_and_allowed(override, key, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert msg.startswith(key + ":"), msg
    assert fragment in msg, msg


def test_errors_from_a_file_name_the_file(tmp_path):
    path = write_yaml(tmp_path, {"train": {"max_steps": "many"}})
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.max_steps: got 'many'"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_override("train.max_steps")
    with pytest.raises(ConfigError, match="empty key part"):
        parse_override("train..max_steps=3")
    with pytest.raises(ConfigError, match="name: got {'sub': 3}"):
        load_config(None, ["name.sub=3"])
    with pytest.raises(ConfigError, match="train.max_steps: is a value"):
        load_config(None, ["train.max_steps=3", "train.max_steps.x=1"])


def test_resolved_config_roundtrips_and_hash_ignores_run_length(tmp_path):
    cfg = load_config(None, ["model.variant=micl", "train.max_steps=3"])
    path = save_resolved(cfg, str(tmp_path / "run"))
    again = load_config(path)
    assert again == cfg
    longer = load_config(None, ["model.variant=micl", "train.max_steps=300", "train.output_dir=elsewhere"])
    assert config_hash(longer) == config_hash(cfg)
    other = load_config(None, ["model.variant=notellm2", "train.max_steps=3"])
    assert config_hash(other) != config_hash(cfg)


def test_cross_key_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^train\.warmup_ratio: got 0\.1 with train\.warmup_steps 7; allowed: one of the two"):
        load_config(None, ["train.warmup_ratio=0.1", "train.warmup_steps=7"])
    with pytest.raises(ConfigError, match=r"^model\.vision\.cls_source: got 'pre_layernorm'; allowed: 'pooled' when model\.vision\.kind is 'plugin'"):
        load_config(None, ["model.vision.kind=plugin", "model.vision.factory=a:b", "model.vision.cls_source=pre_layernorm"])


def test_warmup_ratio_sets_the_warmup_steps_and_a_resolved_config_loads_again(tmp_path):
    cfg = load_config(None, ["train.warmup_ratio=0.1", "train.max_steps=250"])
    assert cfg.train.warmup_steps == 25
    assert load_config(None, ["train.max_steps=250"]).train.warmup_steps == 0  # default: no warm-up
    again = load_config(save_resolved(cfg, str(tmp_path / "run")))  # holds warmup_steps 25 and the ratio
    assert again == cfg
    # Extending the run moves the warm-up with it but keeps the checkpoint hash (run length is not hashed).
    longer = load_config(None, ["train.warmup_ratio=0.1", "train.max_steps=1000"])
    assert longer.train.warmup_steps == 100 and config_hash(longer) == config_hash(cfg)
    assert config_hash(load_config(None, ["train.warmup_ratio=0.2", "train.max_steps=250"])) != config_hash(cfg)


def test_paper_scale_yaml_is_the_authors_recipe():
    cfg = load_config(os.path.join(REPO, "configs", "paper_scale.yaml"))
    t, m = cfg.train, cfg.model
    assert (t.lr_llm, t.lr_new, t.lr_schedule, t.min_lr_ratio, t.weight_decay) == (3e-6, 3e-6, "linear", 0.0, 1e-3)
    assert t.warmup_ratio == 0.1 and t.warmup_steps == round(0.1 * t.max_steps)
    assert t.precision == "bf16" and cfg.data.pairs_per_rank == 16 and m.max_text_tokens == 140
    assert (m.vision.hidden_layer, m.vision.tokens, m.vision.cls_source) == (-1, "cls_patches", "pre_layernorm")
    c = m.connector
    assert (c.kind, c.num_layers, c.cross_attention_frequency, c.ffn_size, c.dropout, c.num_query_tokens) == \
        ("qformer", 6, 2, 3072, 0.1, 16)
    assert (m.fusion.bias, m.fusion.init) == (False, "xavier_normal")
    assert (m.head.bias, m.head.init, m.head.init_std) == (False, "normal", 0.02)
    # Every recipe value in the YAML carries its source.
    with open(os.path.join(REPO, "configs", "paper_scale.yaml")) as fh:
        text = fh.read()
    for key in ("warmup_ratio", "lr_schedule", "lr_llm", "weight_decay", "pairs_per_rank", "precision", "max_text_tokens",
                "hidden_layer", "tokens", "cls_source", "num_layers", "cross_attention_frequency", "ffn_size",
                "dropout", "num_query_tokens"):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(key + ":"))
        assert "[paper]" in line or "[code]" in line, line


def test_new_model_keys_default_to_the_earlier_behaviour():
    m = load_config(None).model
    assert m.vision.cls_source == "pooled"
    assert (m.connector.ffn_size, m.connector.dropout, m.connector.cross_attention_frequency) == (None, 0.0, 1)
    assert (m.fusion.bias, m.fusion.init, m.head.bias, m.head.init) == (True, "default", True, "default")
    assert load_config(None).train.warmup_ratio is None


def test_cli_rejects_bad_config_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, "-m", "notellm2.launcher", "config", "train.max_steps=-1"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert "train.max_steps: got -1; allowed: an integer > 0" in out.stderr


def test_every_shipped_yaml_validates():
    paths = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
    assert paths, "configs/ holds no YAML"
    for path in paths:
        load_config(path)


def test_every_shipped_deepspeed_json_is_valid():
    paths = sorted(glob.glob(os.path.join(REPO, "ds_configs", "*.json")))
    assert paths, "ds_configs/ holds no JSON"
    for path in paths:
        with open(path) as fh:
            ds = json.load(fh)
        where = os.path.basename(path)
        # Batch sizes come from the YAML: the launcher writes them, the JSON must not hold them.
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            assert key not in ds, f"{where}: {key} must come from the YAML"
        assert ds.get("zero_optimization", {}).get("stage") in (2, 3), where


def test_variant_names_come_from_the_one_registry():
    """model.variant accepts exactly the registered variants (notellm2.modeling.names) and lists them when refused."""
    from notellm2.modeling.names import VARIANT_SPECS

    for variant in VARIANT_SPECS:
        assert load_config(None, [f"model.variant={variant}"]).model.variant == variant
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.variant=late"])
    assert str(e.value).endswith("allowed: one of " + ", ".join(repr(v) for v in VARIANT_SPECS))


def test_micl_cross_check_follows_the_registry():
    """The mICL weight check applies to the variants the registry marks as mICL, and only to them."""
    from notellm2.modeling.names import VARIANT_SPECS

    for variant, spec in VARIANT_SPECS.items():
        overrides = [f"model.variant={variant}", "loss.micl_weight_mm=0", "loss.micl_weight_vis=0"]
        if spec.micl:
            with pytest.raises(ConfigError, match="micl_weight_mm"):
                load_config(None, overrides)
        else:
            load_config(None, overrides)


def test_chunk_pairs_must_divide_pairs_per_rank():
    from notellm2.launcher.config import ConfigError, config_hash, load_config

    assert load_config(None, ["data.pairs_per_rank=8", "train.chunk_pairs=4"]).train.chunk_pairs == 4
    with pytest.raises(ConfigError, match=r"^train\.chunk_pairs: got 3; allowed: 0 \(off\) or a divisor of "
                                          r"data\.pairs_per_rank \(8\): 1, 2, 4, 8$"):
        load_config(None, ["data.pairs_per_rank=8", "train.chunk_pairs=3"])
    with pytest.raises(ConfigError, match="train.chunk_pairs"):
        load_config(None, ["train.chunk_pairs=-1"])
    # chunking computes the same step: a run may turn it on or off when it resumes
    assert config_hash(load_config(None, ["train.chunk_pairs=2"])) == config_hash(load_config(None))


def test_the_negative_options_stay_out_of_the_hash_at_their_default():
    """Keys added after runs were hashed (HASH_OMITTED_AT_DEFAULT): off, an older run keeps its hash; on,
    the hash changes (a checkpoint trained with them is another run)."""
    from notellm2.launcher.config import HASH_OMITTED_AT_DEFAULT, config_hash

    cfg = load_config(None, [])
    base = ("train.output_dir", "train.max_steps", "train.chunk_pairs", "checkpoint", "logging", "eval")
    assert config_hash(cfg) == config_hash(cfg, ignore=(*base, *HASH_OMITTED_AT_DEFAULT))
    for key in HASH_OMITTED_AT_DEFAULT:
        assert config_hash(load_config(None, [f"{key}=true"])) != config_hash(cfg), key
