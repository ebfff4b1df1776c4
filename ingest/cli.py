"""The command line: `ingest run`, `ingest migrate`, `ingest simulate`."""

from __future__ import annotations

import argparse
import asyncio
import logging
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

    mig = sub.add_parser("migrate", help="apply pending schema migrations and exit")
    mig.add_argument("--config", metavar="FILE", help="TOML configuration file (INGEST_CONFIG)")
    mig.add_argument("--schema-dir", metavar="DIR", help="folder of *.sql migrations")

    chk = sub.add_parser("check-config", help="validate the configuration and print it")
    chk.add_argument("--config", metavar="FILE", help="TOML configuration file (INGEST_CONFIG)")
    return parser


def _setup_logging(*, level: str = "info", fmt: str = "text") -> None:
    from ingest.logs import configure

    configure(level=level, fmt=fmt)


def _migrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ingest import config as config_mod
    from ingest.migrate import migrate

    cfg = config_mod.load(path=args.config)
    _setup_logging(level=cfg.log.level, fmt=cfg.log.format)
    dsn = cfg.db.migrate_url or cfg.db.url
    schema_dir = Path(args.schema_dir) if args.schema_dir else None
    applied = asyncio.run(migrate(dsn=dsn, schema_dir=schema_dir))
    print(f"ingest: {len(applied)} migration(s) applied" + (f": {', '.join(applied)}" if applied else ", schema is current"))
    return 0


def _run(args: argparse.Namespace) -> int:
    from ingest import config as config_mod
    from ingest.pipeline import run_service

    cfg = config_mod.load(path=args.config)
    _setup_logging(level=cfg.log.level, fmt=cfg.log.format)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run(run_service(cfg))
    return uvloop.run(run_service(cfg))


def _check_config(args: argparse.Namespace) -> int:
    import msgspec

    from ingest import config as config_mod

    cfg = config_mod.load(path=args.config)
    print(msgspec.json.format(msgspec.json.encode(cfg)).decode())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"run": _run, "migrate": _migrate, "check-config": _check_config}
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
