"""The command's options: what `python -m benchmarks.e2e --help` lists."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from benchmarks.e2e import BenchError
from tests.support.stack import ROOT

# Settings the benchmark sets for the ingester itself; every other INGEST_* is passed through.
CONTROLLED = {
    "INGEST_DB_URL",
    "INGEST_MIGRATE_DB_URL",
    "INGEST_MQTT_URL",
    "INGEST_MQTT_TOPIC_PREFIX",
    "INGEST_MQTT_CLIENT_ID",
    "INGEST_MQTT_SHARE_GROUP",
    "INGEST_MQTT_SESSION_EXPIRY_S",
    "INGEST_METRICS_HOST",
    "INGEST_METRICS_PORT",
}


@dataclass(frozen=True, slots=True)
class Options:
    readings: int
    out: Path
    fmt: str
    processes: int
    batch: int
    hz: float
    devices: int | None
    latency_seconds: float
    naive_seconds: float
    ingest_env: dict[str, str]
    keep_database: bool
    py_spy: Path | None
    backlog: bool
    shape: str = "narrow"
    plant: Path | None = None
    rounds: int = 6
    plant_devices: int = 5_000
    instances: int | None = None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.e2e",
        description="End-to-end benchmark on the local stack: direct-COPY limit, naive "
        "per-reading INSERT bridge, and the ingester under load from publisher processes.",
    )
    p.add_argument(
        "--readings", type=int, default=5_000_000, help="readings of the load (5,000,000)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="folder for e2e-<time>.json/.md and latest.md (benchmarks/results)",
    )
    p.add_argument("--format", dest="fmt", choices=("compact", "json"), default="compact")
    p.add_argument("--processes", type=int, default=2, help="publisher processes (2)")
    p.add_argument("--batch", type=int, default=100, help="samples per channel per message (100)")
    p.add_argument("--hz", type=float, default=10.0, help="samples per second per sensor (10)")
    p.add_argument("--devices", type=int, help="use only the first N devices of the plant (all)")
    p.add_argument(
        "--latency-seconds", type=float, default=15.0, help="length of the half-load phase (15)"
    )
    p.add_argument(
        "--naive-seconds", type=float, default=20.0, help="length of the naive baseline (20)"
    )
    p.add_argument(
        "--ingest-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra INGEST_* setting for the ingester under test; repeatable",
    )
    p.add_argument(
        "--backlog",
        action="store_true",
        help="also measure a new ingester process draining a broker backlog, no publisher "
        "running (adds about a third to the run)",
    )
    p.add_argument("--keep-database", action="store_true", help="do not drop the scratch database")
    p.add_argument(
        "--shape",
        choices=("narrow", "wide"),
        default="narrow",
        help="narrow: 240 sensors, long series per message (default); wide: 5,000 devices x 20 "
        "sensors, one sample per sensor per message, see benchmarks/wide.py",
    )
    p.add_argument(
        "--rounds", type=int, default=6, help="wide shape: rounds of one sample per sensor (6)"
    )
    p.add_argument(
        "--wide-devices", type=int, default=5_000, help="wide shape: devices, 20 sensors each"
    )
    p.add_argument(
        "--py-spy",
        type=Path,
        metavar="FILE",
        help="profile the ingester's sustained phase (wide shape: its steady phase) with py-spy "
        "(if installed) into FILE: "
        "speedscope JSON, or a flame graph (.svg) or collapsed stacks (.txt)",
    )
    p.add_argument(
        "--instances",
        type=int,
        metavar="N",
        help="run N ingesters on one shared subscription against the same stream instead: "
        "total rate and its ratio to the direct-COPY limit, each one's CPU per million "
        "readings, lock waits (narrow shape; writes e2e-instances-<N>-<time>.json/.md)",
    )
    return p


def parse_options(argv: list[str] | None) -> Options:
    args = _parser().parse_args(argv)
    for name in ("readings", "processes", "batch", "rounds", "wide_devices"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')}: must be >= 1")
    if args.hz <= 0 or args.latency_seconds <= 0 or args.naive_seconds <= 0:
        raise BenchError("--hz, --latency-seconds and --naive-seconds must be > 0")
    if args.instances is not None and (args.instances < 1 or args.shape != "narrow"):
        raise BenchError("--instances: must be >= 1, with the narrow shape")
    extra: dict[str, str] = {}
    for item in args.ingest_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("INGEST_"):
            raise BenchError(f"--ingest-env {item!r}: expected INGEST_<SECTION>_<KEY>=VALUE")
        if key in CONTROLLED:
            raise BenchError(f"--ingest-env {key}: set by the benchmark itself")
        extra[key] = value
    return Options(
        readings=args.readings,
        out=args.out,
        fmt=args.fmt,
        processes=args.processes,
        batch=args.batch,
        hz=args.hz,
        devices=args.devices,
        latency_seconds=args.latency_seconds,
        naive_seconds=args.naive_seconds,
        ingest_env=extra,
        keep_database=args.keep_database,
        py_spy=args.py_spy,
        backlog=args.backlog,
        shape=args.shape,
        rounds=args.rounds,
        plant_devices=args.wide_devices,
        instances=args.instances,
    )
