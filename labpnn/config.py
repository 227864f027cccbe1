"""Rig configuration files: TOML, validated by pydantic, errors naming the bad field.

A config names the rig, how the device server listens, and the instruments::

    name = "test-rig"
    [server]
    bind = "tcp://127.0.0.1:5555"
    [rig]
    kind = "test"
    n_controls = 16

``build_rig(config)`` turns it into a connected-ready `Rig`.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CurveSection(Strict):
    """CurveZMQ: the server's secret key file and a directory of allowed client public keys."""

    server_secret_key: Path
    authorized_keys: Path


class ServerSection(Strict):
    bind: str = "tcp://127.0.0.1:5555"
    #: PUB socket for live batches and status; "" disables it
    publish: str = "tcp://127.0.0.1:5556"
    max_message_bytes: int = Field(256 * 2**20, gt=0)
    lease_s: float = Field(10.0, gt=0)
    reply_cache: int = Field(64, ge=1)
    curve: CurveSection | None = None


class TestRigSection(Strict):
    kind: Literal["test"]
    n_controls: int = Field(16, gt=0, le=4096)
    n_outputs: int = Field(512, gt=0, le=1_000_000)
    hidden: int = Field(32, gt=0)
    noise: float = Field(0.01, ge=0)
    latency_s: float = Field(0.0, ge=0)
    zero_cost: bool = False
    max_mean_control: float = Field(1.0, gt=0, le=1)
    seed: int = 0


RigSection = Annotated[TestRigSection, Field(discriminator="kind")]


class RigConfig(Strict):
    name: str = "rig"
    server: ServerSection = ServerSection()
    rig: RigSection


class ConfigError(ValueError):
    """A rig config that cannot be used; the message names the file and the field."""


def parse_config(data: dict, source: str = "<config>") -> RigConfig:
    try:
        return RigConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def load_config(path: str | Path) -> RigConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such rig config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, str(path))


def build_rig(config: RigConfig):
    """The `Rig` a config describes (not yet connected)."""
    from labpnn.rig import Rig

    section = config.rig
    if section.kind == "test":
        from labpnn.sim_instruments.test_rig import SimTestRig

        system = SimTestRig(**section.model_dump(exclude={"kind"}))
        return Rig([system], [system], name=config.name)
    raise ConfigError(f"rig kind {section.kind!r} is not supported")
