"""The `ingest` command line: run, drain, migrate, retain, simulate, assets, check-config."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from ingest import __version__
from ingest.arguments import fraction, positive_float
from ingest.errors import ConfigError, IngestError
from ingest.sim.command import add_arguments as add_simulate_arguments
from ingest.sim.command import command as _simulate


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

    add_simulate_arguments(
        sub.add_parser("simulate", help="publish a simulated plant's sensor data")
    )

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
        type=positive_float,
        metavar="SECONDS",
        help="instead of --from/--to: this long up to each device's newest reading",
    )
    base.add_argument("--sensors", default="*", metavar="GLOB", help="sensor names to use (*)")
    base.add_argument(
        "--variance", type=fraction, default=0.99, help="variance the components keep (0.99)"
    )
    base.add_argument(
        "--quantile",
        type=fraction,
        default=0.995,
        help="score quantile (0.995)",
    )
    base.add_argument(
        "--margin", type=positive_float, default=1.1, help="limits = quantile x margin (1.1)"
    )
    base.add_argument("--config", metavar="FILE", help="TOML configuration file (INGEST_CONFIG)")

    chk = sub.add_parser("check-config", help="validate the configuration and print it")
    chk.add_argument("--config", metavar="FILE", help="TOML configuration file (INGEST_CONFIG)")
    return parser


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
    from ingest.service import run_service

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
    from ingest.service import run_service

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
