"""The report: targets met or not, the Markdown table and notes, the JSON document."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec


@dataclass(slots=True)
class Results:
    started: str
    seconds: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    publishers: dict[str, Any] = field(default_factory=dict)
    decode: dict[str, Any] = field(default_factory=dict)
    limit: dict[str, Any] = field(default_factory=dict)
    sustained: dict[str, Any] = field(default_factory=dict)
    half_load: dict[str, Any] = field(default_factory=dict)
    backlog: dict[str, Any] = field(default_factory=dict)
    naive: dict[str, Any] = field(default_factory=dict)
    ingester: dict[str, Any] = field(default_factory=dict)
    derived: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def add_notes(res: Results) -> None:
    sus, half = res.sustained, res.half_load
    if sus["bound"] == "publishers":
        res.notes.append(
            "publisher-bound: the ingester kept up with the publishers "
            f"({sus['publishers_readings_per_s']:,.0f} readings/s), so the sustained figure is a "
            "lower bound of what it can take"
        )
    if not any(res.derived.values()):
        res.notes.append(
            "no rollup or anomaly rows were written: rollups and anomaly filters were not active "
            "in the ingester under test (this build, or its configuration)"
        )
    if half["readings_per_s"] < 0.9 * half["target_readings_per_s"]:
        res.notes.append(
            f"the half-load phase ran at {half['readings_per_s']:,.0f} of the "
            f"{half['target_readings_per_s']:,.0f} readings/s asked"
        )
    if res.machine["load_average_at_start"][0] > 0.5:
        res.notes.append(
            f"the machine was not idle at the start (load average "
            f"{res.machine['load_average_at_start'][0]}): see 'other processes' in the CPU lines"
        )


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    value: str
    target: str
    met: bool | None


def targets(res: Results) -> list[Target]:
    sus, half, compact = res.sustained, res.half_load, res.settings["format"] == "compact"
    rate = sus["readings_per_s"]
    vs_limit = rate / res.limit["readings_per_s"]
    vs_naive = rate / max(res.naive["readings_per_s"], 1e-9)
    cpu = sus["cpu_s_per_million"]
    peak = max(res.ingester["peak_rss_mb"], res.backlog.get("peak_rss_mb", 0.0))
    rows = [
        Target("sustained / direct-COPY limit", f"{vs_limit:.2f}", ">= 0.90", vs_limit >= 0.9),
        Target("sustained / naive baseline", f"{vs_naive:,.0f}x", ">= 100x", vs_naive >= 100),
        Target(
            f"ingester CPU per million readings, sustained ({res.settings['format']})",
            f"{cpu:.2f} core-s",
            "<= 0.5 core-s (compact)",
            cpu <= 0.5 if compact else None,
        ),
        Target(
            "p99 publish-to-commit at half load",
            f"{ms(half['p99_s'])} (bucket {_bucket(half['p99_bucket_s'])}); "
            f"{half['within_250ms']:.1%} within 250 ms",
            "<= 250 ms",
            half["within_250ms"] >= 0.99,
        ),
        Target(
            "p50 publish-to-commit at half load",
            f"{ms(half['p50_s'])} (bucket {_bucket(half['p50_bucket_s'])})",
            "-",
            None,
        ),
        Target("ingester peak RSS", f"{peak:.0f} MB", "<= 300 MB", peak <= 300),
    ]
    for name, dec in res.decode.items():
        value = dec["readings_per_s_per_core"] / 1e6
        rows.append(
            Target(
                f"decode {res.settings['format']}, {name}",
                f"{value:.1f} M readings/s/core",
                ">= 20 M/s/core (compact)",
                value >= 20 if compact else None,
            )
        )
    return rows


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e3:.0f} ms"


def _bucket(bounds: list[float]) -> str:
    lo, hi = bounds
    if math.isnan(lo):
        return "n/a"
    return f"{lo * 1e3:g}-{hi * 1e3:g} ms" if not math.isinf(hi) else f"> {lo * 1e3:g} ms"


def cpu_line(cpu: dict[str, float]) -> str:
    parts = [f"{k} {v:.1f}" for k, v in cpu.items() if k not in ("machine", "wall")]
    cores = cpu["machine"] / max(cpu["wall"], 1e-9)
    return (
        f"{cpu['machine']:.1f} core-s busy in {cpu['wall']:.1f} s ({cores:.2f} of "
        f"{os.cpu_count()} cores): " + ", ".join(parts)
    )


def _ceiling(phase: dict[str, Any]) -> str:
    """What the machine allows at the phase's measured CPU cost, every process counted."""
    cores = os.cpu_count() or 1
    per_reading = phase["cpu"]["machine"] / phase["readings"]
    return (
        f"All processes together spent {per_reading * 1e6:.2f} core-µs per reading: at that "
        f"cost the {cores} cores allow at most {cores / per_reading:,.0f} readings/s."
    )


def render_markdown(res: Results) -> str:
    m, s, sus, limit, naive = res.machine, res.settings, res.sustained, res.limit, res.naive
    half, back = res.half_load, res.backlog
    rate, lim = sus["readings_per_s"], limit["readings_per_s"]
    naive_rate = max(naive["readings_per_s"], 1e-9)
    out = [
        f"# End-to-end benchmark, {res.started}",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, load average at "
        f"start {m['load_average_at_start'][0]}; PostgreSQL {m['postgresql']}, TimescaleDB "
        f"{m['timescaledb']}; Python {m['python']}; ingest {m['ingest']} (git {m['git']}).",
        "",
        f"Load: {s['readings']:,} readings, {s['format']}, {s['devices']} devices, "
        f"{s['sensors']} sensors, {s['samples_per_channel_per_message']} samples per channel per "
        f"message ({s['readings_per_message']} readings), {s['publisher_processes']} publisher "
        f"processes; flush at {s['flush']['max_readings']:,} readings or "
        f"{s['flush']['interval_s']} s. Whole run {res.seconds:.0f} s.",
        "",
        "| measurement | readings/s | ratio |",
        "|---|---:|---:|",
        f"| limit: binary COPY by one writer, {limit['slab_readings']:,}-reading slabs sorted by "
        f"(sensor, time) | {lim:,.0f} | 1.00 |",
        f"| ingester end to end, sustained, publishers alongside ({sus['bound']}-bound) | "
        f"{rate:,.0f} | {rate / lim:.2f} of limit |",
    ]
    if back:
        out.append(
            f"| ingester end to end, draining a broker backlog, no publisher running | "
            f"{back['readings_per_s']:,.0f} | {back['readings_per_s'] / lim:.2f} of limit |"
        )
    out += [
        f"| naive bridge: one INSERT per reading, commit per message | {naive_rate:,.0f} | "
        f"ours {rate / naive_rate:,.0f}x |",
        "",
        "| figure | value | target | met |",
        "|---|---|---|---|",
    ]
    for t in targets(res):
        met = "-" if t.met is None else ("yes" if t.met else "**no**")
        out.append(f"| {t.name} | {t.value} | {t.target} | {met} |")
    bounds = ", ".join(f"{b * 1e3:g}" for b in half["bucket_bounds_s"])
    out += [
        "",
        "Details:",
        "",
        f"- Publishers: {res.publishers['alone_readings_per_s']:,.0f} readings/s with nobody "
        f"subscribed, {sus['publishers_readings_per_s']:,.0f} readings/s alongside the ingester "
        "(both including their processes' start); backlog when they finished: "
        f"{sus['backlog_at_publishers_end']:,.0f} readings.",
        f"- Sustained: {sus['commit_window_s']:.1f} s from first to last commit, "
        f"{sus['flushes']:.0f} flushes; the ingester used {sus['cpu_cores']:.2f} cores; its "
        f"writer was in a flush transaction {sus['writer_busy']:.0%} of the time, in COPY "
        f"{sus['copy_busy']:.0%}. Machine CPU: {cpu_line(sus['cpu'])}. "
        f"{_ceiling(sus)}",
        f"- Half load: {half['readings_per_s']:,.0f} readings/s committed (asked "
        f"{half['target_readings_per_s']:,.0f}), {half['count']:,.0f} messages, "
        f"{half['flushes']:.0f} flushes (p50 {ms(half['flush_p50_s'])}, p99 "
        f"{ms(half['flush_p99_s'])} from first read to commit); ingester "
        f"{half['cpu_s_per_million']:.2f} core-s per million readings. Publish-to-commit is per "
        "message, from the ingest_publish_to_commit_seconds histogram, linear within a bucket "
        f"(bounds {bounds} ms). Machine CPU: {cpu_line(half['cpu'])}.",
        f"- Ingester memory: peak RSS {res.ingester['peak_rss_mb']:.0f} MB (VmHWM, whole life); "
        f"{res.ingester['rss_when_ready_mb']:.0f} MB when ready, {res.ingester['rss_mb']:.0f} MB "
        "after the half-load phase.",
        f"- Filters: rollups {'on' if s['rollups'] else 'off'}, {len(s['anomaly_rules'])} anomaly "
        "rule(s)" + (f" ({_rule_text(s['anomaly_rules'][0])})" if s["anomaly_rules"] else "") + ".",
    ]
    if back:
        out.append(
            f"- Backlog: {back['readings']:,} readings drained in {back['commit_window_s']:.1f} s "
            f"by a new ingester process, {back['cpu_s_per_million']:.2f} core-s per million "
            f"readings, peak RSS {back['peak_rss_mb']:.0f} MB; writer in a flush transaction "
            f"{back['writer_busy']:.0%} of the time. Machine CPU: {cpu_line(back['cpu'])}."
        )
    out += [
        f"- Naive bridge: {naive['readings']:,} readings in {naive['messages']:,} messages over "
        f"{naive['seconds']:.1f} s, {naive['cpu_s']:.1f} CPU-s.",
        "- Derived rows written by the ingester: "
        + ", ".join(f"{k} {v:,}" for k, v in res.derived.items())
        + ".",
    ]
    out += [f"- Note: {note}." for note in res.notes]
    return "\n".join(out) + "\n"


def _rule_text(rule: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in rule.items()
        if v is not None
    )


def finite(value: Any) -> Any:
    """JSON has no NaN or infinity: null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def write_results(res: Results, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = res.started.replace("+00:00", "Z").replace(":", "")
    doc = msgspec.to_builtins(res)
    doc["targets"] = msgspec.to_builtins(targets(res))
    json_path, md_path = out / f"e2e-{stamp}.json", out / f"e2e-{stamp}.md"
    json_path.write_text(json.dumps(finite(doc), indent=2) + "\n")
    markdown = render_markdown(res)
    md_path.write_text(markdown)
    (out / "latest.md").write_text(markdown)
    return json_path, md_path
