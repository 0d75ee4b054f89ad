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
