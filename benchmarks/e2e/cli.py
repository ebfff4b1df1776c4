"""`python -m benchmarks.e2e`: parse the options, run the measurements, report them."""

from __future__ import annotations

import asyncio
import sys

import asyncpg

from benchmarks.e2e.instances import run_instances
from benchmarks.e2e.options import parse_options
from benchmarks.e2e.report import render_markdown, write_results
from benchmarks.e2e.run import run
from benchmarks.wide import run_wide
from ingest import memory
from ingest.errors import ConfigError, IngestError
from tests.support import SupportError


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_options(argv)
        # The limit's writer runs here: it gets the allocator settings `ingest run` uses.
        memory.keep_freed_memory()
        if opts.shape == "wide":
            return run_wide(opts)
        if opts.instances is not None:
            return run_instances(opts)
        res = asyncio.run(run(opts))
        paths = write_results(res, opts.out)
    except SupportError as exc:
        print(f"e2e: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"e2e: the ingester's configuration: {exc}", file=sys.stderr)
        return 1
    except (IngestError, asyncpg.PostgresError, OSError) as exc:
        print(f"e2e: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("e2e: interrupted; its child processes were stopped", file=sys.stderr)
        return 130
    print(render_markdown(res))
    print(f"e2e: wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
