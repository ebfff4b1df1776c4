"""`ingest simulate`: its options and the command, which publishes a simulated plant."""

from __future__ import annotations

import argparse

from ingest.arguments import non_negative_float, positive_float, positive_int
from ingest.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ingest simulate` on its subparser."""
    parser.add_argument(
        "--url", help="broker URL (default: INGEST_MQTT_URL, else mqtt://127.0.0.1:1883)"
    )
    parser.add_argument(
        "--prefix",
        default=None,
        help="topic prefix (default: INGEST_MQTT_TOPIC_PREFIX or telemetry)",
    )
    parser.add_argument(
        "--plant", metavar="FILE", help="plant TOML (lines, devices, sensors); default: built-in"
    )
    parser.add_argument(
        "--devices", type=positive_int, metavar="N", help="use only the first N devices"
    )
    parser.add_argument(
        "--hz", type=positive_float, default=10.0, help="samples per second per sensor (10)"
    )
    parser.add_argument(
        "--batch", type=positive_int, default=10, help="samples per channel per message (10)"
    )
    parser.add_argument(
        "--format",
        choices=("compact", "json", "sparkplug"),
        default="compact",
        help="wire encoding; sparkplug: Sparkplug B edge nodes (births, data, deaths)",
    )
    parser.add_argument(
        "--rate",
        type=non_negative_float,
        default=0.0,
        help="readings per second in all, 0 for as fast as possible (default)",
    )
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="pace by the simulated clock: sample times follow the wall clock",
    )
    parser.add_argument("--start", metavar="RFC3339", help="first sample time (default: now)")
    parser.add_argument(
        "--duration",
        type=non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="simulated seconds per device, 0 for no end (default)",
    )
    parser.add_argument("--processes", type=positive_int, default=1, help="publisher processes (1)")
    parser.add_argument(
        "--anomaly",
        action="append",
        default=[],
        metavar="KIND:GLOB@S[+D]",
        help="inject spike, drift, flatline or overheat on DEVICE/SENSOR matching GLOB at S "
        "simulated seconds (for D seconds); repeatable",
    )
    parser.add_argument(
        "--pumps",
        type=positive_int,
        metavar="N",
        help="instead of the plant: N pumps of eight correlated sensors (temperatures at a "
        "fifth of the rate); --batch a multiple of 5",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND:GLOB@S[+D]",
        help="pumps: inject cavitation, valve or bearing on the pumps matching GLOB at S "
        "simulated seconds, for D seconds (300); repeatable",
    )
    parser.add_argument(
        "--labels", metavar="PATH", help="pumps: write the fault windows to PATH (JSON)"
    )
    parser.add_argument("--record", metavar="PATH", help="record what was published to PATH.<n>")
    parser.add_argument(
        "--ca-file",
        metavar="PEM",
        help="CA certificates to verify an mqtts:// broker with (default: INGEST_MQTT_TLS_CA_FILE,"
        " else the system's)",
    )
    parser.add_argument(
        "--cert-file",
        metavar="PEM",
        help="client certificate (chain) for an mqtts:// broker that asks for one (default: "
        "INGEST_MQTT_TLS_CERT_FILE)",
    )
    parser.add_argument(
        "--key-file",
        metavar="PEM",
        help="the client certificate's private key, if not in --cert-file (default: "
        "INGEST_MQTT_TLS_KEY_FILE)",
    )
    parser.add_argument(
        "--answer-rebirth",
        action="store_true",
        help="sparkplug: edge nodes answer NCMD Node Control/Rebirth with new births",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def command(args: argparse.Namespace) -> int:
    """`ingest simulate`: publish until the duration ends (or forever)."""
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
