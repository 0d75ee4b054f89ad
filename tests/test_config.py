"""Typed config validation: every bad value fails with a message naming the key and the fix."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from omnitrain.config import ConfigError, from_dict, to_dict


@dataclass
class Inner:
    size: int = 4
    mode: Literal["fast", "exact"] = "fast"


@dataclass
class Outer:
    name: str
    out: Path = Path("runs/x")
    rate: float = 0.5
    flag: bool = False
    tags: list[str] = field(default_factory=list)
    maybe: int | None = None
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ValueError("rate must be >= 0")


def test_valid_config_converts_types():
    cfg = from_dict(Outer, {"name": "a", "out": "runs/y", "rate": 1, "tags": ["t"], "inner": {"mode": "exact"}})
    assert cfg.out == Path("runs/y") and isinstance(cfg.rate, float) and cfg.inner == Inner(4, "exact")
    assert to_dict(cfg)["out"] == "runs/y"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"name": "a", "nmae": 1}, "unknown config key 'nmae'"),
        ({"name": "a", "inner": {"sise": 1}}, "Did you mean 'size'?"),
        ({"name": "a", "inner": {"mode": "slow"}}, "inner.mode='slow' is not a valid choice; valid choices: 'fast', 'exact'"),
        ({"name": "a", "rate": "high"}, "rate='high' has the wrong type: expected a number"),
        ({"name": "a", "flag": "yes"}, "flag='yes' has the wrong type: expected true or false"),
        ({"name": "a", "inner": {"size": 2.5}}, "inner.size=2.5 has the wrong type: expected an integer"),
        ({"name": "a", "tags": "t"}, "tags='t' has the wrong type"),
        ({"name": "a", "maybe": "x"}, "maybe='x'"),
        ({}, "missing config key 'name'"),
        ({"name": "???"}, "name must be set"),
        ({"name": "a", "rate": -1}, "rate must be >= 0"),
    ],
)
def test_bad_configs_name_the_key(data, fragment):
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, data)
    assert fragment in str(err.value)


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="expected an integer"):
        from_dict(Inner, {"size": True})


# ----------------------------------------------------------------------------- recipes and dataclass defaults
# Each default has one owner, the config dataclass. A recipe states a field either to make it overridable
# with `key=value` (Hydra refuses keys a recipe lacks), then with the dataclass's value, or to choose
# another value on purpose. These tests hold the recipes to the dataclasses, so that the two cannot drift.
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
BASE_RECIPES = {  # recipe -> (its dataclass, the fields it sets away from the default on purpose)
    "train.yaml": ("omnitrain.train.loop:TrainConfig", set()),
    "strategy/single.yaml": ("omnitrain.train.strategy:StrategyConfig", set()),
    "optim/adamw.yaml": ("omnitrain.train.optim:OptimConfig", set()),
    "model/tiny.yaml": ("omnitrain.model.transformer:ModelConfig", {"n_kv_heads", "qk_norm", "z_loss"}),
    "model/hf.yaml": ("omnitrain.model.transformer:ModelConfig", set()),
}


def dataclass_of(target: str) -> type:
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def load_recipe(name: str) -> dict:
    import yaml

    raw = yaml.safe_load((RECIPES / name).read_text())
    raw.pop("defaults", None)  # group choices and bases: their own files are checked on their own
    return raw


def stated_differences(cls: type, stated: dict) -> set[str]:
    """Dotted keys whose value in ``stated`` (a recipe) is not ``cls``'s default (nested dataclasses walked)."""
    built, default = to_dict(from_dict(cls, stated)), to_dict(cls())

    def walk(s: dict, b: dict, d: dict, prefix: str) -> set[str]:
        out = set()
        for k, v in s.items():
            if isinstance(v, dict) and v and isinstance(d[k], dict) and set(v) <= set(d[k]):
                out |= walk(v, b[k], d[k], f"{prefix}{k}.")
            elif b[k] != d[k]:
                out.add(prefix + k)
        return out

    return walk(stated, built, default, "")


def test_the_defaults_check_can_fail():
    cls = dataclass_of("omnitrain.train.optim:OptimConfig")
    assert stated_differences(cls, {"lr": 3e-4, "warmup_steps": 99, "betas": [0.9, 0.95]}) == {"warmup_steps"}
    assert stated_differences(cls, {"lr": 3.0e-4}) == set()  # the default, however it is written
    assert stated_differences(dataclass_of("omnitrain.train.loop:TrainConfig"), {"wandb": {"mode": "online"}}) == {"wandb.mode"}


@pytest.mark.parametrize("name", list(BASE_RECIPES))
def test_base_recipes_state_the_dataclass_defaults(name):
    target, on_purpose = BASE_RECIPES[name]
    assert stated_differences(dataclass_of(target), load_recipe(name)) == on_purpose
    lines = [line for line in (RECIPES / name).read_text().splitlines() if not line.startswith("#")]
    marked = {line.split(":")[0] for line in lines if "not the default" in line}
    assert marked == on_purpose  # the file says which values are its own choice


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed"])
def test_strategy_recipes_extend_single_with_only_what_they_change(name):
    import yaml

    raw = yaml.safe_load((RECIPES / "strategy" / f"{name}.yaml").read_text())
    assert raw.pop("defaults") == ["single", "_self_"]
    assert raw["name"] == name
    assert stated_differences(dataclass_of("omnitrain.train.strategy:StrategyConfig"), raw) == set(raw)  # no default repeated


def test_no_recipe_states_the_vocabulary_size():
    import dataclasses

    import yaml

    every = {f.name for f in dataclasses.fields(dataclass_of("omnitrain.model.transformer:ModelConfig"))} - {"vocab_size"}
    for path in sorted((RECIPES / "model").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        assert "vocab_size" not in raw, f"{path.name}: the token layout decides the vocabulary"
        if path.stem != "hf":  # a size recipe states its whole architecture, so that model.<field>= overrides it
            assert set(raw) == every, path.name
    for path in sorted((RECIPES / "experiment").glob("*.yaml")):
        assert "vocab_size" not in (yaml.safe_load(path.read_text()).get("model") or {}), path.name
