"""A simulated plant that publishes realistic sensor batches in the device wire format."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np
import numpy.typing as npt

from ingest.errors import ConfigError, IngestError
from ingest.mqtt.packets import publish_properties
from ingest.sim.publisher import Publisher

Kind = Literal["temperature", "vibration", "current", "pressure", "counter", "energy"]
KINDS: tuple[str, ...] = ("temperature", "vibration", "current", "pressure", "counter", "energy")
_UNITS = {
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
class Anomaly:
    """An injected condition: `kind` on sensors matching `pattern` from `at_s` simulated seconds."""

    kind: Literal["spike", "drift", "flatline", "overheat"]
    pattern: str  # glob on device-path/sensor
    at_s: float
    duration_s: float = 60.0

    @staticmethod
    def parse(text: str) -> Anomaly:
        """`spike:plant1/*/press-01/spindle.temp@30` or `flatline:...@60+120` (start+duration)."""
        try:
            kind, rest = text.split(":", 1)
            pattern, when = rest.rsplit("@", 1)
            at, _, duration = when.partition("+")
            if kind not in ("spike", "drift", "flatline", "overheat"):
                raise ValueError
            return Anomaly(kind, pattern, float(at), float(duration) if duration else 60.0)  # type: ignore[arg-type]
        except ValueError:
            raise ConfigError(
                f"--anomaly {text!r}: expected KIND:DEVICE/SENSOR-GLOB@SECONDS[+DURATION] "
                "with KIND spike, drift, flatline or overheat"
            ) from None


@dataclass(frozen=True, slots=True)
class Device:
    path: str  # topic levels after the prefix
    sensors: tuple[tuple[str, str], ...]  # (name, kind)
    seed: int


@dataclass(frozen=True, slots=True)
class SimSettings:
    url: str
    prefix: str
    hz: float
    batch: int
    fmt: Literal["compact", "json", "sparkplug"]
    rate: float  # readings per second for this whole run; 0: as fast as possible
    realtime: bool
    start_us: int
    duration_s: float  # simulated seconds per device; 0: forever
    anomalies: tuple[Anomaly, ...]
    record: str | None
    qos: int = 1
    client_prefix: str = "sim"
    ca_file: str | None = None  # for mqtts://; None: the system's CAs
    answer_rebirth: bool = False  # sparkplug: answer NCMD Node Control/Rebirth


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
                Device(dev_path, tuple(line.sensors.items()), seed=_stable_seed(dev_path))
            )
    return devices


def _stable_seed(text: str) -> int:
    return int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little") ^ len(text) * 7919


class _Signal:
    """Values of one sensor over simulated time, generated a batch at a time."""

    def __init__(self, kind: str, seed: int) -> None:
        self.kind = kind
        self.rng = np.random.default_rng(seed)
        self.base = {
            "temperature": 55.0,
            "vibration": 2.0,
            "current": 12.0,
            "pressure": 160.0,
            "counter": 0.0,
            "energy": 1000.0,
        }[kind] * (0.8 + 0.4 * self.rng.random())
        self.total = self.base

    def values(self, t_s: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        n = len(t_s)
        noise = self.rng.standard_normal(n)
        if self.kind == "temperature":
            return self.base + 3.0 * np.sin(2 * math.pi * t_s / 900.0) + 0.2 * noise
        if self.kind == "vibration":
            return np.abs(self.base + 0.3 * np.sin(2 * math.pi * t_s / 7.0) + 0.1 * noise)
        if self.kind == "current":
            cycle = (np.floor(t_s / 20.0) % 2 == 0).astype(np.float64)
            out: npt.NDArray[np.float64] = self.base * (0.6 + 0.4 * cycle) + 0.3 * noise
            return out
        if self.kind == "pressure":
            return self.base + 2.0 * np.sin(2 * math.pi * t_s / 60.0) + 0.5 * noise
        if self.kind == "counter":
            steps = (self.rng.random(n) < 0.1).astype(np.float64)
            out = self.total + np.cumsum(steps)
            self.total = float(out[-1])
            return out
        steps = np.abs(0.001 + 0.0002 * noise)  # energy meter: kWh, always rising
        out = self.total + np.cumsum(steps)
        self.total = float(out[-1])
        return out


def _inject(
    values: npt.NDArray[np.float64],
    t_s: npt.NDArray[np.float64],
    anomaly: Anomaly,
    *,
    scale: float,
    period_s: float,
    held: dict[Anomaly, float],
) -> None:
    """Apply an injected anomaly in place to the samples at simulated seconds `t_s`.

    A flatline holds the first value it covers (rounded to 3 decimals) across batches; that
    value is kept in `held`, one mapping per sensor.
    """
    if anomaly.kind == "spike":
        # One sample: the first at or after the start time.
        values[(t_s >= anomaly.at_s) & (t_s < anomaly.at_s + period_s)] += 50.0 * max(scale, 1.0)
    elif anomaly.kind == "overheat":
        # A step up for the whole duration: 10x a tenth of the sensor's normal level (a
        # spindle at 44-66 degC then reads 84-132 degC).
        inside = (t_s >= anomaly.at_s) & (t_s < anomaly.at_s + anomaly.duration_s)
        values[inside] += 10.0 * max(scale, 1.0)
    elif anomaly.kind == "drift":
        inside = (t_s >= anomaly.at_s) & (t_s < anomaly.at_s + anomaly.duration_s)
        ramp = np.clip((t_s - anomaly.at_s) / max(anomaly.duration_s, 1e-9), 0, 1)
        values[inside] += 10.0 * max(scale, 1.0) * ramp[inside]
    else:
        inside = (t_s >= anomaly.at_s) & (t_s < anomaly.at_s + anomaly.duration_s)
        if inside.any():
            values[inside] = held.setdefault(anomaly, round(float(values[inside][0]), 3))


class Recorder:
    """Writes exactly what was published: per message the topic and each channel's columns."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._enc = msgspec.msgpack.Encoder()

    def write(
        self, topic: str, channels: list[tuple[str, npt.NDArray[np.int64], npt.NDArray[np.float64]]]
    ) -> None:
        frame = self._enc.encode(
            [
                topic,
                [
                    [name, t.astype("<i8").tobytes(), v.astype("<f8").tobytes()]
                    for name, t, v in channels
                ],
            ]
        )
        self._file.write(len(frame).to_bytes(4, "little") + frame)

    def close(self) -> None:
        self._file.close()


def read_record(
    path: str,
) -> Iterator[tuple[str, str, npt.NDArray[np.int64], npt.NDArray[np.float64]]]:
    """(device path with prefix, sensor, times µs, values) for every channel a recording holds."""
    dec = msgspec.msgpack.Decoder()
    with open(path, "rb") as f:
        while header := f.read(4):
            topic, channels = dec.decode(f.read(int.from_bytes(header, "little")))
            for name, t, v in channels:
                yield topic, name, np.frombuffer(t, "<i8"), np.frombuffer(v, "<f8")


def _encode(
    fmt: str,
    t0: int,
    dt_us: int,
    channels: list[tuple[str, str, npt.NDArray[np.float64]]],
    seq: int,
) -> tuple[bytes, str]:
    if fmt == "json":
        body = {
            "v": 1,
            "t0": t0,
            "seq": seq,
            "ch": [{"s": s, "dt": dt_us, "v": v.tolist(), "u": u} for s, u, v in channels],
        }
        return msgspec.json.encode(body), "application/json"
    body = {
        "v": 1,
        "t0": t0,
        "seq": seq,
        "ch": [
            {"s": s, "dt": dt_us, "v": v.astype("<f8").tobytes(), "u": u} for s, u, v in channels
        ],
    }
    return msgspec.msgpack.encode(body), "application/msgpack"


def run_worker(settings: SimSettings, devices: list[Device], index: int, counter: Any) -> None:
    """Publish the batches of `devices` until the simulated duration is over (one process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the workers
    try:
        client = Publisher(
            settings.url,
            f"{settings.client_prefix}-{os.getpid()}-{index}",
            ca_file=settings.ca_file,
        )
    except IngestError as exc:
        print(f"ingest: publisher {index}: {exc}", file=sys.stderr)
        sys.exit(1)
    recorder = Recorder(f"{settings.record}.{index}") if settings.record else None
    signals = {
        (d.path, s): _Signal(k, d.seed + i) for d in devices for i, (s, k) in enumerate(d.sensors)
    }
    matches = {
        (d.path, s): [
            a for a in settings.anomalies if fnmatch.fnmatchcase(f"{d.path}/{s}", a.pattern)
        ]
        for d in devices
        for s, _ in d.sensors
    }
    held: dict[tuple[str, str], dict[Anomaly, float]] = {key: {} for key in signals}
    dt_us = round(1e6 / settings.hz)
    steps = (
        math.ceil(settings.duration_s * settings.hz / settings.batch) if settings.duration_s else 0
    )
    started = time.monotonic()
    parent = os.getppid()
    sent = 0
    step = 0
    try:
        while (steps == 0 or step < steps) and os.getppid() == parent:  # ends with its parent
            idx = np.arange(step * settings.batch, (step + 1) * settings.batch, dtype=np.int64)
            t_s = idx / settings.hz
            t0 = settings.start_us + step * settings.batch * dt_us
            times = settings.start_us + idx * dt_us
            for dev in devices:
                channels = []
                for name, kind in dev.sensors:
                    values = signals[(dev.path, name)].values(t_s)
                    for anomaly in matches[(dev.path, name)]:
                        _inject(
                            values,
                            t_s,
                            anomaly,
                            scale=abs(signals[(dev.path, name)].base) / 10,
                            period_s=1 / settings.hz,
                            held=held[(dev.path, name)],
                        )
                    channels.append((name, _UNITS[kind], values))
                payload, ctype = _encode(settings.fmt, int(t0), dt_us, channels, step)
                topic = f"{settings.prefix}/{dev.path}"
                props = publish_properties(ctype, [("ts", str(time.time_ns() // 1000))])
                client.publish(topic, payload, qos=settings.qos, properties=props)
                if recorder:
                    recorder.write(topic, [(n, times, v) for n, _, v in channels])
                sent += len(dev.sensors) * settings.batch
                with counter.get_lock():
                    counter.value += len(dev.sensors) * settings.batch
                if settings.rate > 0:
                    ahead = sent / settings.rate - (time.monotonic() - started)
                    if ahead > 0:
                        client.idle(ahead)
            if settings.realtime:
                client.idle((t0 + settings.batch * dt_us) / 1e6 - time.time())
            step += 1
        client.settle(timeout=60)
    except IngestError as exc:
        print(f"ingest: publisher {index}: {exc}", file=sys.stderr)
        sys.exit(1)
    finally:
        if recorder:
            recorder.close()
        client.close()


def _simulate_sparkplug(settings: SimSettings, devices: list[Device]) -> int:
    """Edge nodes with devices, in one process (see ingest.sparkplug.sim)."""
    from ingest.sparkplug.sim import SimDevice, simulate_sparkplug

    started = time.monotonic()
    total = simulate_sparkplug(
        url=settings.url,
        devices=[SimDevice(d.path, d.sensors, d.seed) for d in devices],
        hz=settings.hz,
        batch=settings.batch,
        start_us=settings.start_us,
        duration_s=settings.duration_s,
        realtime=settings.realtime,
        ca_file=settings.ca_file,
        client_prefix=f"{settings.client_prefix}-spb",
        answer_rebirth=settings.answer_rebirth,
    )
    elapsed = time.monotonic() - started
    print(f"simulate: done, {total:,} Sparkplug metrics in {elapsed:.1f}s", file=sys.stderr)
    return total


def simulate(
    settings: SimSettings, devices: list[Device], *, processes: int, progress: bool
) -> int:
    """Publish from `processes` worker processes, showing rate and totals; returns readings sent."""
    if not devices:
        raise ConfigError("the plant has no devices")
    if settings.fmt == "sparkplug":
        return _simulate_sparkplug(settings, devices)
    processes = max(1, min(processes, len(devices)))
    client_id = f"{settings.client_prefix}-{os.getpid()}"
    Publisher(settings.url, client_id, ca_file=settings.ca_file).close()  # fail early
    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    # --rate is for the whole run: each process publishes its share.
    share = dataclasses.replace(settings, rate=settings.rate / processes)
    workers = [
        ctx.Process(target=run_worker, args=(share, devices[i::processes], i, counter), daemon=True)
        for i in range(processes)
    ]
    started = time.monotonic()

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)  # stop the workers too, as Ctrl-C does
    for w in workers:
        w.start()
    stop_progress = threading.Event()

    def show() -> None:
        last, last_t = 0, started
        while not stop_progress.wait(1.0):
            now, total = time.monotonic(), counter.value
            print(
                f"simulate: {total:>12,} readings sent, "
                f"{(total - last) / (now - last_t):>10,.0f}/s",
                file=sys.stderr,
                flush=True,
            )
            last, last_t = total, now

    shower = threading.Thread(target=show, daemon=True) if progress else None
    if shower:
        shower.start()
    try:
        for w in workers:
            w.join()
    except KeyboardInterrupt:
        for w in workers:
            w.terminate()
        for w in workers:
            w.join()
        raise
    finally:
        stop_progress.set()
    failed = [w.exitcode for w in workers if w.exitcode != 0]
    elapsed = time.monotonic() - started
    total = counter.value
    print(
        f"simulate: done, {total:,} readings in {elapsed:.1f}s "
        f"({total / max(elapsed, 1e-9):,.0f}/s)",
        file=sys.stderr,
    )
    if failed:
        raise IngestError(f"{len(failed)} publisher process(es) failed (exit codes {failed})")
    return int(total)
