"""Typed configs: precedence, strictness, round trip, and fuzzed overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from vkd.config import TaskConfig, apply_overrides, dump_config, from_dict, load_config, save_config, to_dict
from vkd.errors import ConfigError


@dataclass
class Inner:
    size: int = 3
    ratio: float = 0.5
    mode: Literal["a", "b"] = "a"
    tags: list[str] = field(default_factory=lambda: ["x"])
    pair: tuple[int, int] = (1, 2)
    maybe: float | None = None
    flag: bool = False


@dataclass
class Demo(TaskConfig):
    task: str = "demo"
    inner: Inner = field(default_factory=Inner)


def test_precedence_defaults_yaml_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: demo\ninner:\n  size: 7\n  ratio: 2\ntrain:\n  lr: 1e-4\n")
    cfg = load_config(Demo, path, ["inner.size=9", "inner.mode=b", "inner.flag=true", "inner.tags=p,q",
                                   "inner.pair=[4, 5]", "inner.maybe=0.25", "run.name=007"])
    assert cfg.inner.size == 9  # --set beats YAML
    assert cfg.inner.ratio == 2.0 and isinstance(cfg.inner.ratio, float)  # YAML beats default, int → float
    assert cfg.train.lr == 1e-4  # "1e-4" is a string to PyYAML; accepted for float fields
    assert cfg.train.steps == 1000  # default
    assert (cfg.inner.mode, cfg.inner.flag, cfg.inner.tags, cfg.inner.pair) == ("b", True, ["p", "q"], (4, 5))
    assert cfg.inner.maybe == 0.25 and cfg.run.name == "007"


def test_yaml_boolean_words_select_the_literal_choice_of_that_name(tmp_path):
    """YAML 1.1 reads ``no`` as False: ``--set train.mixed_precision=no`` and ``mixed_precision: no`` in a preset
    both mean the choice "no"; a boolean matching no choice is still an error."""
    assert load_config(Demo, None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("task: demo\ntrain:\n  mixed_precision: no\n")
    assert load_config(Demo, path).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="inner.mode"):
        load_config(Demo, None, ["inner.mode=no"])


def test_round_trip_reproduces_config(tmp_path):
    cfg = apply_overrides(Demo(), ["inner.size=11", "inner.tags=[u, v]", "train.scheduler=cosine"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(Demo, tmp_path / "config.yaml", task="demo")
    assert again == cfg
    assert yaml.safe_load(dump_config(cfg)) == to_dict(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("inner.sise=3", r"unknown key 'inner.sise'; valid keys under inner: size, ratio, mode"),
        ("nosuch=1", r"unknown key 'nosuch'; valid keys: task, run, train, inner"),
        ("inner.size=3.5", r"inner.size: expected int"),
        ("inner.size=true", r"inner.size: expected int"),
        ("inner.mode=c", r"inner.mode: expected one of 'a', 'b'"),
        ("inner.flag=maybe", r"inner.flag: expected bool"),
        ("inner.pair=[1, 2, 3]", r"inner.pair: expected 2 values"),
        ("inner.size", r"expected KEY=VALUE"),
        ("inner.size.deeper=1", r"'inner.size' is not a section"),
        ("train.steps=0", r"steps must be > 0"),
        ("train.ema_decay=1.5", r"ema_decay must be in"),
        ("inner.ratio=nan", r"NaN"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Demo(), [override])


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Demo, tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("inner: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(Demo, tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(Demo, tmp_path / "list.yaml")
    (tmp_path / "other.yaml").write_text("task: skt\n")
    with pytest.raises(ConfigError, match="config for task 'skt'"):
        load_config(Demo, tmp_path / "other.yaml", task="demo")
    with pytest.raises(ConfigError, match=r"inner: expected mapping \(Inner\), got 3"):
        from_dict(Demo, {"inner": 3})


KEYS = ["inner.size", "inner.ratio", "inner.mode", "inner.tags", "inner.pair", "inner.maybe", "inner.flag",
        "train.lr", "train.steps", "train.betas", "run.name", "task", "inner", "x.y", "", "train..lr"]


@settings(max_examples=300, deadline=None)
@given(key=st.one_of(st.sampled_from(KEYS), st.text(max_size=12)),
       value=st.one_of(st.text(max_size=20), st.integers().map(str), st.floats().map(str),
                       st.sampled_from(["[1, 2]", "{a: 1}", "null", "true", "- x", "[", "1,2", "'q'", "!!python/object:os.system"])),
       sep=st.sampled_from(["=", "", "=="]))
def test_fuzzed_overrides_give_valid_config_or_one_line_error(key, value, sep):
    try:
        cfg = apply_overrides(Demo(), [f"{key}{sep}{value}"])
    except ConfigError as err:
        text = str(err)
        assert text and "\n" not in text
    else:
        assert isinstance(cfg, Demo)
        assert from_dict(Demo, to_dict(cfg)) == cfg  # what was accepted is valid and round-trips


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=80))
def test_fuzzed_yaml_files(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = load_config(Demo, path)
    except ConfigError as err:
        assert "\n" not in str(err)
    else:
        assert isinstance(cfg, Demo)
