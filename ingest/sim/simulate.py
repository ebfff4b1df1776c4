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
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import numpy as np
import numpy.typing as npt

from ingest.errors import ConfigError, IngestError
from ingest.mqtt.outgoing import publish_properties
from ingest.sim.plant import UNITS, Device
from ingest.sim.publisher import Publisher, TlsFiles
from ingest.sim.pumps import SENSORS as PUMP_SENSORS
from ingest.sim.pumps import SLOW, Fault, Pump
from ingest.sim.record import Recorder
from ingest.sim.signals import Anomaly, Signal, inject

Channel = tuple[str, str | None, npt.NDArray[np.float64], int, npt.NDArray[np.int64]]
"""A message's channel: sensor, unit, values, dt (µs) and the values' times."""


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
    tls: TlsFiles | None = None  # for mqtts://; None: the system's CAs, no certificate
    answer_rebirth: bool = False  # sparkplug: answer NCMD Node Control/Rebirth
    faults: tuple[Fault, ...] = ()  # pumps: injected multi-sensor faults


def _encode(fmt: str, t0: int, channels: list[Channel], seq: int) -> tuple[bytes, str]:
    if fmt == "json":
        body = {
            "v": 1,
            "t0": t0,
            "seq": seq,
            "ch": [{"s": s, "dt": dt, "v": v.tolist(), "u": u} for s, u, v, dt, _ in channels],
        }
        return msgspec.json.encode(body), "application/json"
    body = {
        "v": 1,
        "t0": t0,
        "seq": seq,
        "ch": [
            {"s": s, "dt": dt, "v": v.astype("<f8").tobytes(), "u": u}
            for s, u, v, dt, _ in channels
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
            tls=settings.tls,
        )
    except IngestError as exc:
        print(f"ingest: publisher {index}: {exc}", file=sys.stderr)
        sys.exit(1)
    recorder = Recorder(f"{settings.record}.{index}") if settings.record else None
    pumps = {d.path: Pump(d.path, d.seed, settings.faults) for d in devices if d.pump}
    signals = {
        (d.path, s): Signal(k, d.seed + i)
        for d in devices
        if not d.pump
        for i, (s, k) in enumerate(d.sensors)
    }
    matches = {
        (d.path, s): [
            a for a in settings.anomalies if fnmatch.fnmatchcase(f"{d.path}/{s}", a.pattern)
        ]
        for d in devices
        if not d.pump
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
                channels: list[Channel] = []
                if dev.pump:
                    made = pumps[dev.path].values(idx, hz=settings.hz, start_us=settings.start_us)
                    for name, (t, v) in made.items():
                        unit, slow = PUMP_SENSORS[name][0], PUMP_SENSORS[name][4]
                        channels.append((name, unit, v, dt_us * (SLOW if slow else 1), t))
                for name, kind in () if dev.pump else dev.sensors:
                    values = signals[(dev.path, name)].values(t_s)
                    for anomaly in matches[(dev.path, name)]:
                        inject(
                            values,
                            t_s,
                            anomaly,
                            scale=abs(signals[(dev.path, name)].base) / 10,
                            period_s=1 / settings.hz,
                            held=held[(dev.path, name)],
                        )
                    channels.append((name, UNITS[kind], values, dt_us, times))
                payload, ctype = _encode(settings.fmt, int(t0), channels, step)
                topic = f"{settings.prefix}/{dev.path}"
                props = publish_properties(ctype, [("ts", str(time.time_ns() // 1000))])
                client.publish(topic, payload, qos=settings.qos, properties=props)
                if recorder:
                    recorder.write(topic, [(n, t, v) for n, _, v, _, t in channels])
                readings = sum(len(c[2]) for c in channels)
                sent += readings
                with counter.get_lock():
                    counter.value += readings
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
        tls=settings.tls,
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
    Publisher(settings.url, client_id, tls=settings.tls).close()  # fail early
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
