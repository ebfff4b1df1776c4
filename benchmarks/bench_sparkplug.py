"""Sparkplug B DATA decoding: our numba decoder against protobuf (upb) plus a Python loop.

Payloads as plants send them: NDATA of 100 aliased metrics each (timestamp, alias, a mix of
Double, Float, Int32, Int16 and Boolean values; no names, no datatypes: both come from the
birth). Ours: one kernel call decodes, looks the aliases up in the node's table, reads each
value as its birth's datatype, takes times and qualities and drops what is not stored.
Baseline, measured in the same run: upb parses the payload and a Python loop does the same per
metric. Prints metrics/s and the ratio; run with
`make bench` or `python -m benchmarks.bench_sparkplug`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ingest.sparkplug.aliases import AliasTable
from ingest.sparkplug.wire import decode_data
from tests.support.sparkplug import new_payload, payload_class

METRICS = 100
PAYLOADS = 200
T0_MS = 1_767_225_600_000
DATATYPES = (10, 9, 3, 2, 11)  # Double, Float, Int32, Int16, Boolean


def _payloads() -> list[bytes]:
    rng = np.random.default_rng(7)
    out = []
    for p in range(PAYLOADS):
        payload = new_payload()
        payload.timestamp = T0_MS + p * 1000
        payload.seq = p % 256
        for i in range(METRICS):
            m = payload.metrics.add()
            m.alias = i
            m.timestamp = T0_MS + p * 1000 + i
            datatype = DATATYPES[i % len(DATATYPES)]
            if datatype == 10:
                m.double_value = float(rng.normal(50, 5))
            elif datatype == 9:
                m.float_value = float(rng.normal(50, 5))
            elif datatype == 11:
                m.boolean_value = bool(i % 2)
            else:
                m.int_value = int(rng.integers(-1000, 1000)) & 0xFFFFFFFF
        out.append(bytes(payload.SerializeToString()))
    return out


TABLE = AliasTable.build(
    aliases=np.arange(METRICS, dtype=np.int64),
    sensors=np.arange(1000, 1000 + METRICS, dtype=np.int32),
    datatypes=np.array([DATATYPES[i % len(DATATYPES)] for i in range(METRICS)], np.int64),
)
SENSOR_OF = {i: 1000 + i for i in range(METRICS)}
DATATYPE_OF = {i: DATATYPES[i % len(DATATYPES)] for i in range(METRICS)}


def ours(data: bytes) -> int:
    """What the service does per NDATA at intake: one kernel call decodes the payload and
    returns its readings (times, sensors, values, qualities), filtered, with skip counts."""
    readings = decode_data(
        data,
        TABLE,
        max_metrics=1_000_000,
        received_us=0,
        window=(-(2**63), 2**63 - 1),
        store_transient=False,
    )
    assert readings is not None
    return len(readings.readings)


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def baseline(data: bytes) -> int:
    payload = payload_class().FromString(data)
    fallback = payload.timestamp * 1000
    sensors, times, values, qualities = [], [], [], []
    for m in payload.metrics:
        datatype = DATATYPE_OF[m.alias]
        sensors.append(SENSOR_OF[m.alias])
        times.append(m.timestamp * 1000 if m.HasField("timestamp") else fallback)
        if datatype == 3:
            values.append(float(_signed(m.int_value, 32)))
        elif datatype == 2:
            values.append(float(_signed(m.int_value, 16)))
        elif datatype == 11:
            values.append(float(m.boolean_value))
        elif datatype == 9:
            values.append(float(m.float_value))
        else:
            values.append(m.double_value)
        qualities.append(0)
    np.array(values, np.float64), np.array(times, np.int64)
    return len(values)


def _rate(fn: Callable[[bytes], int], payloads: list[bytes], *, rounds: int = 20) -> float:
    """Best of `rounds` passes over all payloads, in metrics per second of this process's CPU
    time (per core, and fair on a machine whose cores other work shares)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        metrics = sum(fn(p) for p in payloads)
        best = min(best, time.process_time() - started)
    return metrics / best


def run() -> dict[str, Any]:
    payloads = _payloads()
    ours(payloads[0])  # compile / load the kernels
    fast = _rate(ours, payloads)
    slow = _rate(baseline, payloads)
    print(
        f"\nsparkplug NDATA, {METRICS} metrics/payload: ours {fast / 1e6:.1f} M metrics/s, "
        f"protobuf + Python loop {slow / 1e6:.2f} M metrics/s, ratio {fast / slow:.1f}x "
        f"(target >= 10 M metrics/s per core)"
    )
    return {"ours": fast, "baseline": slow}


def test_sparkplug_data_decoding() -> None:
    figures = run()
    assert figures["ours"] > 0  # figures are reported, never asserted


if __name__ == "__main__":
    run()
