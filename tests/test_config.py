"""shared.config: YAML -> typed dataclasses, overrides, and errors that name the bad key."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from shared.config import ConfigError, config_to_dict, load_config, save_config


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    name: Literal["adamw", "sgd"] = "adamw"


@dataclass
class Model:
    depth: int = 6
    hidden_size: int = 64


@dataclass
class Cfg:
    optim: Optim = field(default_factory=Optim)
    model: Model = field(default_factory=Model)
    steps: int = 10
    out: Path = Path("runs")
    resume: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_load_with_overrides_and_base(tmp_path):
    write(tmp_path / "model.yaml", {"depth": 12, "hidden_size": 384})
    write(tmp_path / "base.yaml", {"steps": 5, "optim": {"lr": 3e-4}})
    cfg_path = write(tmp_path / "run.yaml", {"base": "base.yaml", "model": "model.yaml", "tags": ["a"]})
    cfg = load_config(Cfg, cfg_path, ["optim.name=sgd", "model.depth=2", "optim.lr=1e-3", "resume=null"])
    assert cfg.steps == 5
    assert cfg.optim == Optim(lr=1e-3, name="sgd")
    assert cfg.model == Model(depth=2, hidden_size=384)  # override on top of a section given as a file
    assert cfg.tags == ["a"] and cfg.resume is None
    assert isinstance(cfg.optim.betas, tuple)


def test_round_trip_through_saved_file(tmp_path):
    cfg = load_config(Cfg, None, ["steps=7", "out=/tmp/x"])
    saved = save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Cfg, saved) == cfg
    assert config_to_dict(cfg)["out"] == "/tmp/x"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.name=adam", "optim.name: 'adam' is not allowed; choose one of 'adamw', 'sgd'"),
        ("optim.lrr=1", "unknown key optim.lrr; allowed keys in optim: betas, lr, name"),
        ("model.depth=two", "model.depth: expected an integer, got 'two'"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 items"),
        ("steps=0", "steps must be positive, got 0"),
        ("nokey", "must look like key.sub=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, None, [override])
    assert message in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, bad)
