"""The simulated plant's shape: lines, devices and their sensors, from TOML or built in."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

from ingest.errors import ConfigError

Kind = Literal["temperature", "vibration", "current", "pressure", "counter", "energy"]
KINDS: tuple[str, ...] = ("temperature", "vibration", "current", "pressure", "counter", "energy")
UNITS = {
    "temperature": "degC",
    "vibration": "mm/s",
    "current": "A",
    "pressure": "bar",
    "counter": "parts",
    "energy": "kWh",
}


class LineSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One production line: its asset path, its devices and each device's sensors."""

    path: str
    devices: int | list[str] = 5
    device_prefix: str = "machine"
    sensors: dict[str, Kind] = msgspec.field(
        default_factory=lambda: {
            "spindle.temp": "temperature",
            "vib.rms": "vibration",
            "motor.current": "current",
            "hydraulic.pressure": "pressure",
            "parts": "counter",
            "energy": "energy",
        }
    )

    def device_names(self) -> list[str]:
        if isinstance(self.devices, list):
            return list(self.devices)
        return [f"{self.device_prefix}-{i:02d}" for i in range(1, self.devices + 1)]


class PlantSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A plant: lines of devices. The built-in default has 2 sites, 40 devices, 240 sensors."""

    line: list[LineSpec] = msgspec.field(
        default_factory=lambda: [
            LineSpec(path=f"{site}/{area}/line{n}", device_prefix=prefix)
            for site in ("plant1", "plant2")
            for area, prefix in (("press-shop", "press"), ("assembly", "robot"))
            for n in (1, 2)
        ]
    )


@dataclass(frozen=True, slots=True)
class Device:
    path: str  # topic levels after the prefix
    sensors: tuple[tuple[str, str], ...]  # (name, kind)
    seed: int
    pump: bool = False  # correlated sensors from ingest.sim.pumps instead of one signal each


def load_plant(path: str | None) -> list[Device]:
    """The devices of a plant TOML file (see PlantSpec), or of the built-in plant."""
    spec = PlantSpec()
    if path:
        try:
            spec = msgspec.convert(tomllib.loads(Path(path).read_text()), type=PlantSpec)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"plant file {path}: {exc}") from exc
        except msgspec.ValidationError as exc:
            raise ConfigError(f"plant file {path}: {exc}") from exc
    devices = []
    for line in spec.line:
        for name in line.device_names():
            dev_path = f"{line.path}/{name}"
            devices.append(
                Device(dev_path, tuple(line.sensors.items()), seed=stable_seed(dev_path))
            )
    return devices


def pump_devices(n: int) -> list[Device]:
    """`n` simulated pumps (`ingest.sim.pumps`), each with its eight correlated sensors."""
    from ingest.sim.pumps import SENSORS, pump_paths

    return [
        Device(path, tuple((name, "pump") for name in SENSORS), stable_seed(path), pump=True)
        for path in pump_paths(n)
    ]


def stable_seed(text: str) -> int:
    return int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little") ^ len(text) * 7919
