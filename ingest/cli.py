"""The `ingest` command line: run, drain, migrate, retain, simulate, assets, check-config."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from ingest import __version__
from ingest.errors import ConfigError, IngestError


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one readable line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ingest", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ingest {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the ingester until SIGTERM or Ctrl-C")
    run.add_argument("--config", metavar="FILE", help="TOML configuration file (INGEST_CONFIG)")

    drn = sub.add_parser(
        "drain",
        help="ingest what the broker holds for another member's session, then end that session",
    )
    drn.add_argument("--config", metavar="FILE", help="TOML configuration file (INGEST_CONFIG)")
    drn.add_argument(
        "--client-id",
        required=True,
        metavar="ID",
        help="the client id of the member that will not come back",
    )

    mig = sub.add_parser("migrate", help="apply pending schema migrations and exit")
    mig.add_argument("--config", metavar="FILE", help="TOML configuration file (INGEST_CONFIG)")
    mig.add_argument("--schema-dir", metavar="DIR", help="folder of *.sql migrations")

    ret = sub.add_parser(
        "retain", help="drop chunks older than the [retention] settings (as the schema owner)"
    )
    ret.add_argument("--config", metavar="FILE", help="TOML configuration file (INGEST_CONFIG)")
    ret.add_argument(
        "--dry-run", action="store_true", help="only list the chunks that would be dropped"
    )

    sim = sub.add_parser("simulate", help="publish a simulated plant's sensor data")
    sim.add_argument(
        "--url", help="broker URL (default: INGEST_MQTT_URL, else mqtt://127.0.0.1:1883)"
    )
    sim.add_argument(
        "--prefix",
        default=None,
        help="topic prefix (default: INGEST_MQTT_TOPIC_PREFIX or telemetry)",
    )
    sim.add_argument(
        "--plant", metavar="FILE", help="plant TOML (lines, devices, sensors); default: built-in"
    )
    sim.add_argument(
        "--devices", type=_positive_int, metavar="N", help="use only the first N devices"
    )
    sim.add_argument(
        "--hz", type=_positive_float, default=10.0, help="samples per second per sensor (10)"
    )
    sim.add_argument(
        "--batch", type=_positive_int, default=10, help="samples per channel per message (10)"
    )
    sim.add_argument(
        "--format",
        choices=("compact", "json", "sparkplug"),
        default="compact",
        help="wire encoding; sparkplug: Sparkplug B edge nodes (births, data, deaths)",
    )
    sim.add_argument(
        "--rate",
        type=_non_negative_float,
        default=0.0,
        help="readings per second in all, 0 for as fast as possible (default)",
    )
    sim.add_argument(
        "--realtime",
        action="store_true",
        help="pace by the simulated clock: sample times follow the wall clock",
    )
    sim.add_argument("--start", metavar="RFC3339", help="first sample time (default: now)")
    sim.add_argument(
        "--duration",
        type=_non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="simulated seconds per device, 0 for no end (default)",
    )
    sim.add_argument("--processes", type=_positive_int, default=1, help="publisher processes (1)")
    sim.add_argument(
        "--anomaly",
        action="append",
        default=[],
        metavar="KIND:GLOB@S[+D]",
        help="inject spike, drift, flatline or overheat on DEVICE/SENSOR matching GLOB at S "
        "simulated seconds (for D seconds); repeatable",
    )
    sim.add_argument(
        "--pumps",
        type=_positive_int,
        metavar="N",
        help="instead of the plant: N pumps of eight correlated sensors (temperatures at a "
        "fifth of the rate); --batch a multiple of 5",
    )
    sim.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND:GLOB@S[+D]",
        help="pumps: inject cavitation, valve or bearing on the pumps matching GLOB at S "
        "simulated seconds, for D seconds (300); repeatable",
    )
    sim.add_argument(
        "--labels", metavar="PATH", help="pumps: write the fault windows to PATH (JSON)"
    )
    sim.add_argument("--record", metavar="PATH", help="record what was published to PATH.<n>")
    sim.add_argument(
        "--ca-file",
        metavar="PEM",
        help="CA certificates to verify an mqtts:// broker with (default: INGEST_MQTT_TLS_CA_FILE,"
        " else the system's)",
    )
    sim.add_argument(
        "--cert-file",
        metavar="PEM",
        help="client certificate (chain) for an mqtts:// broker that asks for one (default: "
        "INGEST_MQTT_TLS_CERT_FILE)",
    )
    sim.add_argument(
        "--key-file",
        metavar="PEM",
        help="the client certificate's private key, if not in --cert-file (default: "
        "INGEST_MQTT_TLS_KEY_FILE)",
    )
    sim.add_argument(
        "--answer-rebirth",
        action="store_true",
        help="sparkplug: edge nodes answer NCMD Node Control/Rebirth with new births",
    )
    sim.add_argument("--quiet", action="store_true", help="no progress lines")

    # alerts: asset metadata (ingest/alerts/assets.py)
    assets = sub.add_parser("assets", help="asset metadata for alerts")
    assets_sub = assets.add_subparsers(dest="assets_command", required=True, parser_class=_Parser)
    imp = assets_sub.add_parser("import", help="import asset metadata from YAML or CSV")
    imp.add_argument("file", metavar="FILE", help="a .yaml/.yml or .csv file")
    imp.add_argument("--config", metavar="FILE", help="TOML configuration file (INGEST_CONFIG)")

    base = sub.add_parser(
        "baseline", help="fit devices' asset-health models from a healthy period's readings"
    )
    base.add_argument("--device", required=True, metavar="GLOB", help="device paths to fit")
    base.add_argument("--from", dest="start", metavar="RFC3339", help="start of the period")
    base.add_argument("--to", dest="end", metavar="RFC3339", help="end of the period (excluded)")
    base.add_argument(
        "--last",
        type=_positive_float,
        metavar="SECONDS",
        help="instead of --from/--to: this long up to each device's newest reading",
    )
    base.add_argument("--sensors", default="*", metavar="GLOB", help="sensor names to use (*)")
    base.add_argument(
        "--variance", type=_fraction, default=0.99, help="variance the components keep (0.99)"
    )
    base.add_argument(
        "--quantile",
        type=_fraction,
        default=0.995,
        help="score quantile (0.995)",
    )
    base.add_argument(
        "--margin", type=_positive_float, default=1.1, help="limits = quantile x margin (1.1)"
    )
    base.add_argument("--config", metavar="FILE", help="TOML configuration file (INGEST_CONFIG)")

    chk = sub.add_parser("check-config", help="validate the configuration and print it")
    chk.add_argument("--config", metavar="FILE", help="TOML configuration file (INGEST_CONFIG)")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a number between 0 and 1")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value


def _simulate(args: argparse.Namespace) -> int:
    import os
    import time

    from ingest.config import parse_rfc3339_us
    from ingest.sim.plant import load_plant, pump_devices
    from ingest.sim.publisher import TlsFiles
    from ingest.sim.pumps import SLOW, Fault
    from ingest.sim.signals import Anomaly
    from ingest.sim.simulate import SimSettings, simulate

    if args.pumps and (args.plant or args.format == "sparkplug" or args.batch % SLOW):
        raise ConfigError(
            f"--pumps: takes no --plant, no sparkplug format, and a --batch multiple of {SLOW}"
        )
    if (args.fault or args.labels) and not args.pumps:
        raise ConfigError("--fault and --labels need --pumps")
    devices = pump_devices(args.pumps) if args.pumps else load_plant(args.plant)
    if args.devices:
        devices = devices[: args.devices]
    if args.start:
        try:
            start_us = parse_rfc3339_us(args.start)
        except ValueError as exc:
            raise ConfigError(f"--start: {exc}") from None
    else:
        start_us = time.time_ns() // 1000
    url = args.url or os.environ.get("INGEST_MQTT_URL", "mqtt://127.0.0.1:1883")
    if url.lower().startswith("mqtts://"):  # unset options: from the ingester's environment
        tls = TlsFiles(
            *(
                given or os.environ.get(f"INGEST_MQTT_TLS_{name.upper()}") or None
                for name, given in (
                    ("ca_file", args.ca_file),
                    ("cert_file", args.cert_file),
                    ("key_file", args.key_file),
                )
            )
        )
    else:
        tls = TlsFiles(args.ca_file, args.cert_file, args.key_file)
    settings = SimSettings(
        url=url,
        prefix=args.prefix or os.environ.get("INGEST_MQTT_TOPIC_PREFIX", "telemetry"),
        hz=args.hz,
        batch=args.batch,
        fmt=args.format,
        rate=args.rate,
        realtime=args.realtime,
        start_us=start_us,
        duration_s=args.duration,
        anomalies=tuple(Anomaly.parse(a) for a in args.anomaly),
        record=args.record,
        tls=tls,
        answer_rebirth=args.answer_rebirth,
        faults=tuple(Fault.parse(f, start_us=start_us) for f in args.fault),
    )
    if args.labels:
        import msgspec

        with open(args.labels, "wb") as f:
            f.write(msgspec.json.encode(settings.faults))
    simulate(settings, devices, processes=args.processes, progress=not args.quiet)
    return 0


def _setup_logging(*, level: str = "info", fmt: str = "text") -> None:
    from ingest.logs import configure

    configure(level=level, fmt=fmt)


def _migrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ingest import config as config_mod
    from ingest.db.migrate import migrate

    cfg = config_mod.load(path=args.config, for_migrate=True)
    _setup_logging(level=cfg.log.level, fmt=cfg.log.format)
    dsn = cfg.db.migrate_url or cfg.db.url
    schema_dir = Path(args.schema_dir) if args.schema_dir else None
    applied = asyncio.run(migrate(dsn=dsn, schema_dir=schema_dir))
    print(
        f"ingest: {len(applied)} migration(s) applied"
        + (f": {', '.join(applied)}" if applied else ", schema is current")
    )
    return 0


def _retain(args: argparse.Namespace) -> int:
    from ingest import config as config_mod
    from ingest.db.retention import retain

    cfg = config_mod.load(path=args.config, for_migrate=True)
    dsn = cfg.db.migrate_url or cfg.db.url
    outcomes = asyncio.run(retain(dsn=dsn, retention=cfg.retention, dry_run=args.dry_run))
    if not outcomes:
        print("ingest: retain: no retention set (retention.*_days), nothing dropped")
    verb = "would drop" if args.dry_run else "dropped"
    for o in outcomes:
        print(
            f"ingest: retain telemetry.{o.table}: {verb} {len(o.chunks)} "
            f"{'row(s)' if o.table == 'alert_outbox' else 'chunk(s)'} with data "
            f"older than {o.cutoff:%Y-%m-%dT%H:%M:%SZ} ({o.days:g} days)"
        )
    return 0


def _assets(args: argparse.Namespace) -> int:
    from ingest import config as config_mod
    from ingest.alerts.assets import import_file

    cfg = config_mod.load(path=args.config, for_migrate=True)
    dsn = cfg.db.migrate_url or cfg.db.url
    rows, changed = asyncio.run(import_file(dsn=dsn, path=args.file))
    print(f"ingest: assets import {args.file}: {rows} row(s), {changed} changed")
    return 0


def _baseline(args: argparse.Namespace) -> int:
    from ingest.asset.baseline import command

    return command(args)


def _run(args: argparse.Namespace) -> int:
    from ingest import config as config_mod
    from ingest import memory
    from ingest.pipeline import run_service

    cfg = config_mod.load(path=args.config)
    _setup_logging(level=cfg.log.level, fmt=cfg.log.format)
    memory.keep_freed_memory()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run(run_service(cfg))
    return uvloop.run(run_service(cfg))


def _drain(args: argparse.Namespace) -> int:
    import msgspec

    from ingest import config as config_mod
    from ingest import memory
    from ingest.mqtt import Settings
    from ingest.pipeline import run_service

    cfg = config_mod.load(path=args.config)
    fields = msgspec.structs.asdict(cfg.mqtt)
    fields["client_id"] = args.client_id
    cfg = msgspec.structs.replace(cfg, mqtt=Settings(**fields))
    _setup_logging(level=cfg.log.level, fmt=cfg.log.format)
    memory.keep_freed_memory()
    return asyncio.run(run_service(cfg, drain=True))


def _check_config(args: argparse.Namespace) -> int:
    import msgspec

    from ingest import config as config_mod

    cfg = config_mod.load(path=args.config)
    shown = msgspec.to_builtins(cfg)
    for section, key in (("db", "url"), ("db", "migrate_url"), ("mqtt", "url")):
        shown[section][key] = re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", shown[section][key])
    for sink in shown["alerts"]["sinks"]:  # alerts: sink credentials (ingest/alerts)
        sink["url"] = re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", sink["url"])
        for secret in ("password", "routing_key"):
            if sink.get(secret):
                sink[secret] = "***"
        if "headers" in sink:
            sink["headers"] = {k: "***" for k in sink["headers"]}
    print(msgspec.json.format(msgspec.json.encode(shown)).decode())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "run": _run,
        "drain": _drain,
        "migrate": _migrate,
        "simulate": _simulate,
        "retain": _retain,
        "check-config": _check_config,
        "assets": _assets,
        "baseline": _baseline,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"ingest: config: {exc}", file=sys.stderr)
        return 2
    except IngestError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
