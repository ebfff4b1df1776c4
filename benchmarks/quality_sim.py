"""Asset-health quality on a simulated plant of pumps with labelled multi-sensor faults.

    python -m benchmarks.quality_sim [--pumps 6] [--hours 8] [--labels PATH]

Each pump (`ingest.sim.pumps`: eight sensors driven by one load, temperatures at a fifth of the
rate) runs a healthy baseline hour, then `--hours` with faults (cavitation, a throttled valve, a
bearing) that shift three or four sensors at once, each by 1.5 to 3.5 times its own noise, far
inside its normal range. Through the product's path: the readings are encoded as wire-format
MessagePack messages of `--batch` samples per channel, decoded by `decode_batch`; the baseline's
vectors are built and fitted as `ingest baseline` does (`carry_forward`, `fit`), and the test
period runs message by message through the scoring kernel, the state carried between messages
as the database carries it between flushes.

Scored pointwise over the pumps' test timestamps: a timestamp is flagged when it lies in an
event (start to end; an open event to the end of the data), a fault when it lies in a fault
window. F1, the false-alarm rate (flagged healthy timestamps / healthy timestamps) and the
missed-alarm rate (unflagged fault timestamps / fault timestamps). For comparison, one generic
per-sensor rule on every sensor (a timestamp is flagged when any sensor's event covers it).
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from ingest.anomaly.detector import AnomalyDetector
from ingest.anomaly.rules import AnomalyRule
from ingest.asset.kernel import NO_TIME, fresh_state
from ingest.asset.model import carry_forward, fit
from ingest.asset.rules import AssetRule
from ingest.decode import DecodeLimits, decode_batch
from ingest.sim.pumps import SENSORS, Fault, Pump, pump_paths, schedule

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
NAMES = tuple(SENSORS)
TARGET_F1 = 0.8
TARGET_FALSE_ALARMS = 0.10
RULE = AssetRule(match="*", hold_s=10.0)
GENERIC = AnomalyRule(
    match="*", spike_window=60, spike_threshold=5.0, drift_window=20, drift_baseline=200,
    drift_sigma=4.0,
)  # fmt: skip


@dataclass(frozen=True)
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    events: int = 0
    faults: int = 0
    caught: int = 0  # faults with a flagged timestamp inside
    false_events: int = 0  # events touching no fault

    def __add__(self, o: Counts) -> Counts:
        return Counts(*(getattr(self, f) + getattr(o, f) for f in self.__dataclass_fields__))

    @property
    def f1(self) -> float:
        return 2 * self.tp / max(2 * self.tp + self.fp + self.fn, 1)

    @property
    def false_alarms(self) -> float:
        return self.fp / max(self.fp + self.tn, 1)

    @property
    def missed(self) -> float:
        return self.fn / max(self.tp + self.fn, 1)


def messages(pump: Pump, *, first: int, count: int, hz: float, batch: int) -> list[bytes]:
    """Samples [first, first + count) of a pump as wire-format v1 MessagePack messages."""
    encoder = msgspec.msgpack.Encoder()
    out = []
    for at in range(first, first + count, batch):
        idx = np.arange(at, min(at + batch, first + count), dtype=np.int64)
        values = pump.values(idx, hz=hz, start_us=T0)
        t0 = T0 + at * round(1e6 / hz)
        channels = [
            {"s": name, "t": (t - t0).astype("<i8").tobytes(), "v": v.astype("<f8").tobytes()}
            for name, (t, v) in values.items()
            if len(t)
        ]
        out.append(encoder.encode({"v": 1, "t0": t0, "ch": channels}))
    return out


def _decoded(payload: bytes, limits: DecodeLimits, now_us: int) -> tuple[npt.NDArray[Any], ...]:
    b = decode_batch(payload, content_type="application/msgpack", limits=limits, now_us=now_us)
    index = np.repeat(
        np.array([NAMES.index(n) for n in b.names], np.int32), np.array(b.counts, np.int64)
    )
    return index, b.time, b.value


def run_pump(
    path: str,
    seed: int,
    faults: list[Fault],
    *,
    hz: float,
    batch: int,
    base_s: float,
    test_s: float,
) -> tuple[Counts, Counts]:
    """(asset model, generic per-sensor rule) counts for one pump."""
    pump = Pump(path, seed, tuple(faults))
    limits = DecodeLimits(min_time_us=1)
    n_base, n_test = round(base_s * hz), round(test_s * hz)
    now_us = T0 + round((base_s + test_s) * 1e6) + 86_400_000_000
    parts = [
        _decoded(p, limits, now_us)
        for p in messages(pump, first=0, count=n_base, hz=hz, batch=batch)
    ]
    index, time, value = (np.concatenate([p[i] for p in parts]) for i in range(3))
    _, x = carry_forward(index, time, value, len(NAMES), hold_us=RULE.hold_us)
    model = fit(NAMES, x)
    ints, floats = fresh_state(len(NAMES))
    generic = AnomalyDetector()
    for j in range(len(NAMES)):
        generic.assign(sensor_id=j, rule=GENERIC)
        t_b, v_b = time[index == j], value[index == j]
        generic.restore(sensor_id=j, time=t_b, value=v_b, open_events=())
    events: dict[int, tuple[int, int]] = {}
    sensor_events: dict[tuple[int, str, int], tuple[int, int]] = {}
    for payload in messages(pump, first=n_base, count=n_test, hz=hz, batch=batch):
        index, time, value = _decoded(payload, limits, now_us)
        order = np.argsort(time, kind="stable")
        _, _, ev_i, _ = model.run(
            index[order], time[order], value[order], hold_us=RULE.hold_us, gap_us=RULE.gap_us,
            min_us=RULE.min_us, ints=ints, floats=floats,
        )  # fmt: skip
        for e in ev_i.tolist():
            events[e[0]] = (e[0], e[1])
        by_sensor = np.lexsort((time, index))
        pending = generic.process(
            sensor=index[by_sensor], time=time[by_sensor], value=value[by_sensor]
        )
        generic.commit(pending)
        for ev in pending.events:
            sensor_events[(ev.sensor, ev.kind, ev.start)] = (
                ev.start,
                NO_TIME if ev.end is None else ev.end,
            )
    ts = T0 + (n_base + np.arange(n_test, dtype=np.int64)) * round(1e6 / hz)
    truth = np.zeros(n_test, np.bool_)
    for f in pump.faults:
        truth |= (ts >= f.start_us) & (ts < f.end_us)
    spans = [(f.start_us, f.end_us - 1) for f in pump.faults]
    return (
        _count(ts, truth, list(events.values()), spans),
        _count(ts, truth, list(sensor_events.values()), spans),
    )


def _count(
    ts: npt.NDArray[np.int64],
    truth: npt.NDArray[np.bool_],
    events: list[tuple[int, int]],
    faults: list[tuple[int, int]],
) -> Counts:
    flagged = np.zeros(len(ts), np.bool_)
    false_events = 0
    for start, end in events:
        last = int(ts[-1]) if end == NO_TIME else end
        flagged |= (ts >= start) & (ts <= last)
        false_events += not any(start <= b and a <= last for a, b in faults)
    caught = sum(bool(flagged[(ts >= a) & (ts <= b)].any()) for a, b in faults)
    return Counts(
        int((flagged & truth).sum()),
        int((flagged & ~truth).sum()),
        int((~flagged & truth).sum()),
        int((~flagged & ~truth).sum()),
        len(events),
        len(faults),
        caught,
        false_events,
    )


def report(
    *, pumps: int, hours: float, hz: float, batch: int, seed: int, labels: Path | None
) -> None:
    base_s, test_s = 3600.0, hours * 3600.0
    paths = pump_paths(pumps)
    faults = schedule(
        paths, start_us=T0 + round(base_s * 1e6), duration_s=test_s, seed=seed, every_s=1800.0
    )
    if labels is not None:
        labels.write_bytes(msgspec.json.encode(faults))
    asset, generic = Counts(), Counts()
    for i, path in enumerate(paths):
        mine = [f for f in faults if f.device == path]
        a, g = run_pump(
            path, seed * 1000 + i, mine, hz=hz, batch=batch, base_s=base_s, test_s=test_s
        )
        asset, generic = asset + a, generic + g
    print(
        f"simulated pumps: {pumps} pumps x {len(NAMES)} sensors, {hz:g} Hz (temperatures "
        f"{hz / 5:g} Hz), 1 h baseline, {hours:g} h scored, {len(faults)} labelled faults "
        f"({sum(f.end_us - f.start_us for f in faults) / 1e6 / 3600:.2f} h of {pumps * hours:g} h)"
    )
    print(f"target: F1 >= {TARGET_F1} at a false-alarm rate <= {TARGET_FALSE_ALARMS:.0%}\n")
    print(f"{'detector':<44}  {'F1':>5}  false alarms  missed  events  faults caught  false events")
    rows = (
        (f"asset health (T² + Q, min {RULE.min_duration_s:g} s, gap {RULE.gap_s:g} s)", asset),
        ("spike 60 k=5 + drift 20/200 4σ, every sensor", generic),
    )
    for name, c in rows:
        print(
            f"{name:<44}  {c.f1:>5.3f}  {c.false_alarms:>11.1%}  {c.missed:>6.1%}  {c.events:>6}"
            f"  {c.caught:>6} / {c.faults:<5}  {c.false_events:>12}"
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.quality_sim",
        description="Asset-health quality on simulated pumps with labelled multi-sensor faults.",
    )
    p.add_argument("--pumps", type=int, default=6, help="pumps (6)")
    p.add_argument("--hours", type=float, default=8.0, help="hours scored per pump (8)")
    p.add_argument("--hz", type=float, default=1.0, help="samples per second (1)")
    p.add_argument("--batch", type=int, default=10, help="samples per channel per message (10)")
    p.add_argument("--seed", type=int, default=17, help="fault schedule and noise seed (17)")
    p.add_argument("--labels", type=Path, help="write the fault windows to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.batch < 5 or args.batch % 5:
        print("quality_sim: --batch must be a multiple of 5", file=sys.stderr)
        return 2
    report(
        pumps=args.pumps, hours=args.hours, hz=args.hz, batch=args.batch, seed=args.seed,
        labels=args.labels,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
