"""`ingest simulate` against the real broker, with the ingester writing to the real database.

What the simulator records is compared with what the database holds, reading for reading, and
the anomalies it injects must come out of the ingester's filters as events.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import asyncpg
import numpy as np
import pytest

from ingest.sim.plant import stable_seed
from ingest.sim.pumps import Fault, Pump
from tests.support.cluster import Database
from tests.support.ingester import Ingester, ingest_cli, ingester_env
from tests.support.process import wait_until
from tests.support.rows import stored
from tests.support.streams import T0, recorded

START = "2026-01-01T00:00:00Z"  # T0
S = 1_000_000  # a second in µs


async def simulate(*args: str) -> tuple[int, str]:
    """Run `ingest simulate` to the end: (exit status, what it wrote to stderr)."""
    code, _, err = await ingest_cli("simulate", *args)
    return code, err


def plant(folder: Path, site: str) -> Path:
    """A plant file: two presses and two robots, the six default sensors each, under `site`."""
    path = folder / "plant.toml"
    path.write_text(
        f'[[line]]\npath = "{site}/press-shop/line1"\ndevices = ["press-01", "press-02"]\n'
        f'[[line]]\npath = "{site}/assembly/line1"\ndevices = ["robot-01", "robot-02"]\n'
    )
    return path


async def events(db: Database, site: str) -> list[tuple[str, str, str, int, int | None]]:
    conn = await asyncpg.connect(db.analyst_url)
    try:
        rows = await conn.fetch(
            "SELECT device, sensor, kind, (extract(epoch FROM ts) * 1000000)::bigint AS t,"
            "       (extract(epoch FROM end_ts) * 1000000)::bigint AS e"
            "  FROM telemetry.anomalies_v WHERE device LIKE $1 || '/%' ORDER BY 1, 2, 3, 4",
            site,
        )
    finally:
        await conn.close()
    return [(r["device"], r["sensor"], r["kind"], r["t"], r["e"]) for r in rows]


@pytest.mark.parametrize("fmt", ["compact", "json"])
async def test_what_simulate_records_is_exactly_what_is_stored(
    database: Database, mqtt_url: str, prefix: str, tmp_path: Path, fmt: str
) -> None:
    site = f"site-{uuid.uuid4().hex[:8]}"
    spiked, stuck = f"{site}/press-shop/line1/press-01", f"{site}/assembly/line1/robot-02"
    rules = [
        {"match": f"{site}/*/spindle.temp", "spike_window": 8, "spike_min_sigma": 0.5},
        {"match": f"{stuck}/vib.rms", "flatline_count": 20},
    ]
    env = ingester_env(database, mqtt_url, prefix, INGEST_ANOMALY_RULES=json.dumps(rules))
    ingester = await Ingester(env).start()
    try:
        code, err = await simulate(
            *("--url", mqtt_url, "--prefix", prefix, "--plant", str(plant(tmp_path, site))),
            *("--format", fmt, "--start", START, "--batch", "10", "--duration", "6"),
            *("--processes", "2", "--record", str(tmp_path / "load"), "--quiet"),
            *("--anomaly", f"spike:{spiked}/spindle.temp@3"),
            *("--anomaly", f"flatline:{stuck}/vib.rms@1+4"),
        )
        assert code == 0, err
        assert err.startswith("simulate: done, 1,440 readings in "), err
        expected = recorded(str(tmp_path / "load.*"), prefix)
        assert len(expected) == 4 * 6 * 60  # devices x sensors x (6 s at 10 Hz)

        async def all_stored() -> bool:
            return len(await stored(database, site)) >= len(expected)

        await wait_until(all_stored, timeout=60)
        assert set(await stored(database, site)) == expected
        # The spike is one sample at 3 s; the flatline holds one value from 1 s to 4.9 s (40
        # samples across four batches) and is judged from its 20th sample on.
        assert await events(database, site) == [
            (stuck, "vib.rms", "flatline", T0 + 1 * S, T0 + 4_900_000),
            (spiked, "spindle.temp", "spike", T0 + 3 * S, T0 + 3 * S),
        ]
    finally:
        assert await ingester.stop() == 0


async def test_pumps_publish_correlated_sensors_with_labelled_faults(
    database: Database, mqtt_url: str, prefix: str, tmp_path: Path
) -> None:
    env = ingester_env(database, mqtt_url, prefix)
    ingester = await Ingester(env).start()
    labels = tmp_path / "faults.json"
    try:
        code, err = await simulate(
            *("--url", mqtt_url, "--prefix", prefix, "--pumps", "2", "--hz", "1"),
            *("--start", START, "--batch", "10", "--duration", "20", "--quiet"),
            *("--record", str(tmp_path / "load"), "--labels", str(labels)),
            *("--fault", "valve:*/pump-02@5+10"),
        )
        assert code == 0, err
        # Per pump: five sensors at 1 Hz for 20 s, three temperatures every 5 s.
        assert err.startswith("simulate: done, 224 readings in "), err
        expected = recorded(str(tmp_path / "load.*"), prefix)
        assert len(expected) == 224

        async def all_stored() -> bool:
            return len(await stored(database, "plant9")) >= len(expected)

        await wait_until(all_stored, timeout=60)
        assert set(await stored(database, "plant9")) == expected
    finally:
        assert await ingester.stop() == 0
    pump2 = "plant9/pumps/line1/pump-02"
    assert json.loads(labels.read_text()) == [
        {"kind": "valve", "device": "*/pump-02", "start_us": T0 + 5 * S, "end_us": T0 + 15 * S}
    ]
    # The recording is the pumps' own signals, the fault shifting pump-02's pressure by three
    # times its noise (0.05 bar) from 5 s to 15 s and nothing else.
    fault = Fault("valve", "*/pump-02", T0 + 5 * S, T0 + 15 * S)
    idx = np.arange(20, dtype=np.int64)

    def signals(pump: Pump) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """As the simulator draws them: a batch of 10 samples at a time."""
        a, b = (pump.values(idx[k : k + 10], hz=1.0, start_us=T0) for k in (0, 10))
        return {n: (np.r_[a[n][0], b[n][0]], np.r_[a[n][1], b[n][1]]) for n in a}

    clean = signals(Pump(pump2, stable_seed(pump2)))
    shifted = signals(Pump(pump2, stable_seed(pump2), (fault,)))
    got = {(t, n): v for t, d, n, v, _ in expected if d == pump2}
    for name, (t, v) in shifted.items():
        assert [got[(x, name)] for x in t.tolist()] == v.tolist()
    delta = shifted["pressure"][1] - clean["pressure"][1]
    assert np.allclose(delta, np.where((idx >= 5) & (idx < 15), 0.15, 0.0), atol=1e-9)
    assert np.array_equal(shifted["temp.motor"][1], clean["temp.motor"][1])


async def test_progress_lines_show_rate_and_total(mqtt_url: str, prefix: str) -> None:
    code, err = await simulate(
        *("--url", mqtt_url, "--prefix", prefix, "--devices", "2", "--batch", "10"),
        *("--duration", "3", "--rate", "120", "--start", START),
    )
    assert code == 0, err
    lines = err.splitlines()
    progress, last = lines[:-1], lines[-1]
    assert progress, err  # at 120 readings/s, 360 readings take 3 s: a line a second
    assert all(line.startswith("simulate: ") and line.endswith("/s") for line in progress)
    assert " readings sent, " in progress[-1]
    assert last.startswith("simulate: done, 360 readings in "), err


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["--anomaly", "wobble:*@1"],
            2,
            "ingest: config: --anomaly 'wobble:*@1': expected KIND:DEVICE/SENSOR-GLOB@SECONDS"
            "[+DURATION] with KIND spike, drift, flatline or overheat",
        ),
        (["--plant", "/nonexistent/plant.toml"], 2, "ingest: config: plant file /nonexistent/"),
        (
            ["--url", "http://broker"],
            2,
            "ingest: config: --url 'http://broker': expected mqtt://host[:port] or mqtts://",
        ),
        (
            ["--url", "mqtt://127.0.0.1:1"],
            1,
            "ingest: cannot connect to the broker at 127.0.0.1:1: [Errno 111] Connection refused",
        ),
        (["--processes", "0"], 2, "ingest simulate: argument --processes: "),
        (
            ["--pumps", "2", "--batch", "7"],
            2,
            "ingest: config: --pumps: takes no --plant, no sparkplug format, and a --batch "
            "multiple of 5",
        ),
        (["--fault", "valve:*@1"], 2, "ingest: config: --fault and --labels need --pumps"),
        (
            ["--pumps", "1", "--fault", "leak:*@1"],
            2,
            "ingest: config: --fault 'leak:*@1': expected KIND:DEVICE-GLOB@SECONDS[+DURATION] "
            "with KIND cavitation, valve, bearing",
        ),
        (
            ["--url", "mqtts://127.0.0.1:1", "--ca-file", "/nonexistent/ca.pem"],
            2,
            "ingest: config: --ca-file '/nonexistent/ca.pem': cannot load it: ",
        ),
        (
            ["--url", "mqtt://127.0.0.1:1", "--ca-file", "/nonexistent/ca.pem"],
            2,
            "ingest: config: --ca-file: set, but --url 'mqtt://127.0.0.1:1' is not mqtts://",
        ),
    ],
)
async def test_bad_arguments_exit_with_one_line(args: list[str], code: int, message: str) -> None:
    status, err = await simulate(*args)
    assert status == code, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(message), err
