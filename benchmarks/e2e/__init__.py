"""End-to-end benchmark: the direct-COPY limit, a naive bridge and the ingester under load.

One run on the local stack (``deploy/local/stack up``; its ``env`` exported), in this order:

1. the limit: the load's rows (recorded by the publishers), binary-COPYed by one writer in
   flush-sized slabs sorted by (sensor, time) into a table defined like ``telemetry.readings``;
2. ``ingest run`` as its own process, rollups and anomaly filters on, fed by unpaced
   ``ingest simulate`` publisher processes: readings/s sustained between the first and the last
   commit, ingester CPU seconds per million readings, where the machine's CPU went;
3. publish-to-commit latency at half that rate (after a VACUUM, so that an autovacuum does not
   land in the window by chance), and peak RSS; with ``--backlog`` also a new ingester process
   draining a broker backlog with no publisher running;
4. the naive baseline: ``benchmarks.naive``, one INSERT per reading, a commit per message;
5. a table of the ratios, printed and written as JSON and Markdown.

    python -m benchmarks.e2e [--readings N] [--out DIR] [--format compact|json] [--backlog] ...

``--shape wide`` runs a plant's shape instead (benchmarks/wide.py); ``--instances N`` runs N
ingesters on one shared subscription against the same stream (`instances`).

Every run creates its own scratch database and drops it at the end; a CHECKPOINT precedes each
measured phase. Targets are reported, never asserted: the exit status is 0 whenever the
measurements completed.

The modules: `options` and `cli` (the command), `load` (the simulated load, its recording, decode
speed), `baselines` (the scratch database's tables, the direct-COPY limit, the naive bridge),
`processes` (the child processes, the ingester under test and how it is polled), `measure`
(CPU from /proc, histograms, the machine), `run` (the phases of the default run),
`instances` (several ingesters on one share group), `report` (targets, Markdown, JSON).
"""

import sys

from tests.support import SupportError


class BenchError(SupportError):
    """A measurement could not be completed; the message is one readable line."""


def say(text: str) -> None:
    """One line of progress on stderr."""
    print(f"e2e: {text}", file=sys.stderr, flush=True)
