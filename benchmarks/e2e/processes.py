"""The benchmark's child processes, and the ingester under test: its settings, how it is
started (kernels compiled first, as in the container image), and how its progress is polled."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.e2e import BenchError
from benchmarks.e2e.measure import delta, grown, histogram, proc_cpu_s, quantile
from benchmarks.e2e.options import CONTROLLED, Options
from ingest.anomaly.rules import MAX_DRIFT_SPAN
from tests.support.cluster import Database
from tests.support.ingester import WARM_UP, Ingester, metric_sum
from tests.support.process import Child

_LATENCY_METRIC = "ingest_publish_to_commit_seconds"
_POLL_S = 0.5  # /metrics costs the ingester CPU too: poll gently
WRITTEN = "ingest_readings_written_total"


class Children:
    """Every child of the run, each in a process group of its own with its stderr in a log
    file of `folder`; all still running are stopped when the run ends, however it ends."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._all: list[Child] = []

    def log(self, name: str) -> Path:
        """The log file of the next child named `name`."""
        return self.folder / f"{len(self._all):02d}-{re.sub(r'[^a-z0-9]+', '-', name)}.log"

    def adopt(self, child: Child) -> Child:
        self._all.append(child)
        return child

    async def start(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        stdout: bool = False,
    ) -> Child:
        child = Child(
            name,
            argv,
            env=dict(os.environ) if env is None else env,
            log=self.log(name),
            own_group=True,
            stdout=stdout,
        )
        return await self.adopt(child).start()

    def running(self) -> list[Child]:
        return [c for c in self._all if c.running]

    async def stop_all(self) -> None:
        for child in reversed(self._all):
            await child.stop(grace=5.0)


# ------------------------------------------------------------------------------ the ingester


# The targets hold with rollups and anomaly filters on: every filter on every sensor, with
# limits that suit the simulated plant (they fire on its current steps and counter plateaus),
# and drift over an hour's baseline (and a minute's window) at the simulated rate.
def default_filters(hz: float) -> dict[str, str]:
    """The ingester settings of the default filter set for sensors sampled at `hz` (the
    baseline stops at the longest a rule allows)."""
    window = max(1, round(60 * hz))
    baseline = min(max(2, round(3600 * hz)), MAX_DRIFT_SPAN - window)
    return {
        "INGEST_ROLLUPS_ENABLED": "true",
        "INGEST_ANOMALY_RULES": json.dumps(
            [
                {
                    "match": "*",
                    "min": -1e6,
                    "max": 1e6,
                    "max_rate": 1000.0,
                    "spike_window": 32,
                    "spike_threshold": 6.0,
                    "spike_min_sigma": 0.5,
                    "drift_window": window,
                    "drift_baseline": baseline,
                    "drift_sigma": 6.0,
                    "drift_min_sigma": 0.5,
                    "flatline_count": 100,
                    "flatline_seconds": 60.0,
                }
            ]
        ),
    }


def ingester_env(
    opts: Options, db: Database, *, mqtt_url: str, prefix: str, client_id: str | None = None
) -> dict[str, str]:
    """The whole environment of an ingester under test: the default filters unless this
    process's environment sets them, this process's INGEST_* settings except those the
    benchmark sets itself, then `--ingest-env`."""
    env = {k: v for k, v in default_filters(opts.hz).items() if k not in os.environ}
    env.update({k: v for k, v in os.environ.items() if k not in CONTROLLED})
    env.update(
        {
            "INGEST_DB_URL": db.ingest_url,
            "INGEST_MQTT_URL": mqtt_url,
            "INGEST_MQTT_TOPIC_PREFIX": prefix,
            "INGEST_MQTT_CLIENT_ID": client_id or f"bench-e2e-{uuid.uuid4().hex[:8]}",
            # Long enough to hold the backlog between two ingester processes, then forgotten.
            "INGEST_MQTT_SESSION_EXPIRY_S": "600",
            **opts.ingest_env,
        }
    )
    return env


async def spawn_ingester(
    children: Children, env: dict[str, str], *, port: int, name: str = "ingest run"
) -> Ingester:
    """`ingest run` with `env` (nothing else of this process's environment) and its metrics
    on `port`, after its kernels were compiled into numba's on-disk cache in a process of
    their own, as the container image does when it is built: the process under test loads
    its kernels rather than compiling them, and its memory is the running service's."""
    compiler = await children.start("kernel warm-up", WARM_UP, env=env)
    if await compiler.wait(timeout=300, doing="compiling the kernels") != 0:
        raise BenchError(f"kernel warm-up failed{compiler.tail()}")
    ingester = Ingester(env, port=port, inherit=False, log=children.log(name), own_group=True)
    ingester.child.name = name
    children.adopt(ingester.child)
    return await ingester.spawn()


async def stop_ingester(ingester: Ingester) -> None:
    """SIGTERM; it must exit 0 (its last flush written and acknowledged) within 90 s."""
    code = await ingester.stop(timeout=90)
    if code != 0:
        raise BenchError(f"{ingester.child.name} exited with status {code}{ingester.tail()}")


def _py_spy_argv(target: Path, pid: int) -> list[str]:
    venv_bin = str(Path(sys.executable).parent)
    exe = shutil.which("py-spy") or shutil.which("py-spy", path=venv_bin)
    if exe is None:
        raise BenchError("--py-spy: py-spy is not installed (pip install py-spy)")
    fmt = {".svg": "flamegraph", ".txt": "raw"}.get(target.suffix, "speedscope")
    argv = [exe, "record", "--pid", str(pid), "--rate", "200", "--format", fmt]
    return [*argv, "--output", str(target.resolve()), "--nonblocking"]


async def start_py_spy(children: Children, target: Path | None, pid: int) -> Child | None:
    """py-spy recording process `pid` into `target`, if asked for."""
    if target is None:
        return None
    return await children.start("py-spy", _py_spy_argv(target, pid))


async def stop_py_spy(spy: Child | None) -> None:
    if spy is not None:
        spy.signal(signal.SIGINT)
        await spy.wait(timeout=60, doing="writing its profile")


# ------------------------------------------------------------------------------ polling


class Sample(NamedTuple):
    """One poll: counters of the same /metrics answer, and the ingester's CPU right after."""

    at: float  # monotonic
    written: float
    commit: float  # unix time of the last commit
    flush_s: float  # total time in flush transactions
    copy_s: float  # total time in COPY
    cpu: float


async def drive(
    ingester: Ingester,
    before: dict[str, float],
    readings: int,
    *,
    timeout: float,  # noqa: ASYNC109 - a deadline
    publisher: Child | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Poll /metrics until `readings` more are written. Rate, CPU and writer time are taken
    between the first and the last poll that saw a commit (the first flush's own time is before
    the first commit, so it is left out with it)."""
    samples: list[Sample] = []
    pub_end_written: float | None = None
    began = datetime.now(UTC)
    deadline = time.monotonic() + timeout
    while True:
        m = await ingester.metrics()
        now, cpu = time.monotonic(), proc_cpu_s(ingester.pid)

        sample = Sample(
            now,
            grown(m, before, WRITTEN),
            metric_sum(m, "ingest_last_commit_timestamp_seconds"),
            grown(m, before, "ingest_flush_duration_seconds_sum"),
            grown(m, before, "ingest_copy_duration_seconds_sum"),
            cpu,
        )
        samples.append(sample)
        rejected = {
            k: v
            for k, v in m.items()
            if v > before.get(k, 0.0)
            and k.startswith(("ingest_dead_letters_total", "ingest_readings_duplicate_total"))
        }
        if rejected:
            raise BenchError(f"the ingester rejected or skipped part of the load: {rejected}")
        if publisher is not None and publisher.proc is not None:
            code = publisher.proc.returncode
            if code not in (None, 0):
                publisher.check_alive()
            if code == 0 and pub_end_written is None:
                pub_end_written = sample.written
        if sample.written >= readings:
            break
        if now > deadline:
            raise BenchError(
                f"the ingester wrote {sample.written:,.0f} of {readings:,} readings within "
                f"{timeout:.0f}s"
            )
        await asyncio.sleep(_POLL_S)
    progress = [x for x in samples if x.written > 0]
    a, b = progress[0], progress[-1]
    window = b.commit - a.commit
    nan = math.nan
    ok = window > 0 and b.written > a.written
    out = {
        "window_utc": [began.isoformat(), datetime.now(UTC).isoformat()],
        "readings": readings,
        "readings_per_s": (b.written - a.written) / window if ok else nan,
        "commit_window_s": window,
        "cpu_s_per_million": (b.cpu - a.cpu) / (b.written - a.written) * 1e6 if ok else nan,
        "cpu_cores": (b.cpu - a.cpu) / (b.at - a.at) if ok else nan,
        "flushes": grown(m, before, "ingest_flush_readings_count"),
        "writer_busy": (b.flush_s - a.flush_s) / window if ok else nan,
        "copy_busy": (b.copy_s - a.copy_s) / window if ok else nan,
    }
    if publisher is not None:
        done = pub_end_written if pub_end_written is not None else readings
        out["backlog_at_publishers_end"] = readings - done
    return out, m


def latency(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Quantiles of publish-to-commit (per message) and of flush duration, from histogram deltas."""
    out: dict[str, Any] = {}
    for key, metric in (("", _LATENCY_METRIC), ("flush_", "ingest_flush_duration_seconds")):
        buckets = delta(histogram(after, metric), histogram(before, metric))
        total = buckets[-1][1] if buckets else 0.0
        for q in (0.5, 0.99):
            value, lo, hi = quantile(buckets, q)
            out[f"{key}p{q * 100:g}_s"] = value
            out[f"{key}p{q * 100:g}_bucket_s"] = [lo, hi]
        out[f"{key}count"] = total
        if not key:
            out["within_250ms"] = dict(buckets).get(0.25, math.nan) / total if total else math.nan
            out["bucket_bounds_s"] = [b for b, _ in buckets if not math.isinf(b)]
    return out
