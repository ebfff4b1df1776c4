"""Deploy files (image, compose, Kubernetes, Prometheus, Grafana) agree with the code."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import asyncpg
import msgspec
import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from ingest import config, metrics
from ingest.config import Config, Flush, Limits, Metrics
from ingest.db.migrate import default_schema_dir, load_migrations
from ingest.errors import ConfigError
from tests.support.cluster import Database
from tests.support.net import free_port
from tests.support.tools import promtool, run_tool

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests must validate against

# Settings read from the environment that do not follow INGEST_<SECTION>_<KEY>.
ENV_ALIASES = {"INGEST_MIGRATE_DB_URL": ("db", "migrate_url")}
ENV_EXTRA = {"INGEST_CONFIG"}  # the configuration file's path


# ---------------------------------------------------------------- what the code defines


def valid_env_names() -> set[str]:
    """Every INGEST_* variable the configuration reads, from the Config struct."""
    aliased = {target: name for name, target in ENV_ALIASES.items()}
    names = set(ENV_EXTRA)
    for section in msgspec.structs.fields(Config):
        for field in msgspec.structs.fields(section.type):
            key = (section.name, field.name)
            names.add(aliased.get(key, f"INGEST_{section.name}_{field.name}".upper()))
    return names


def test_valid_env_names_match_what_load_accepts() -> None:
    names = valid_env_names()
    assert {"INGEST_DB_URL", "INGEST_MQTT_SHARE_GROUP", "INGEST_METRICS_PORT"} <= names
    env = {"INGEST_DB_URL": "postgresql://u@h/d"}
    unknown = []
    for name in sorted(names - ENV_EXTRA):
        try:  # a bad value is fine here: only an unknown name matters
            config.load(env={**env, name: "1"})
        except ConfigError as exc:
            if "unknown setting" in str(exc):
                unknown.append(name)
    assert not unknown, f"computed names that load() rejects: {unknown}"
    with pytest.raises(ConfigError, match="unknown setting"):
        config.load(env={**env, "INGEST_DB_MIGRATE_URL": "postgresql://u@h/d"})


@pytest.fixture(scope="module")
def exposition() -> str:
    """The live Prometheus text exposition of the process (ingest.metrics imported)."""
    return generate_latest(REGISTRY).decode()


def sample_names(text: str) -> set[str]:
    """Every series name the exposition can carry, with the suffixes of counters and histograms
    (families with labels and no children yet expose no sample, so suffixes are derived)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def label_names() -> dict[str, set[str]]:
    """Label names of the service's own metrics, by series name."""
    out: dict[str, set[str]] = {}
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            labels = set(obj._labelnames) | {"job", "instance"}
            for family in obj.describe():
                base = family.name
                for suffix in ("", "_total", "_bucket", "_sum", "_count", "_created"):
                    out[base + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


# ---------------------------------------------------------------- helpers


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


_DEFAULT = re.compile(r"\$\{([A-Z0-9_]+):-([^}]*)\}")


def compose_value(value: object) -> str:
    """A compose environment value with each ${VAR:-default} replaced by its default."""
    text = str(value)
    assert "${" not in _DEFAULT.sub("", text), f"{text!r}: use ${{VAR:-default}}"
    return _DEFAULT.sub(lambda m: m.group(2), text)


_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def promql_metrics(expr: str) -> list[tuple[str, set[str]]]:
    """The series names an expression selects, each with the label names it groups or matches by."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    grouped: set[str] = set()
    for clause in _GROUPING.findall(text):
        grouped.update(x.strip() for x in clause.split(",") if x.strip())
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    found = []
    for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?", text):
        name, matchers, call = m.group(1), m.group(2) or "", m.group(3)
        if call or name in {"and", "or", "unless", "bool", "offset"} or name.startswith("__"):
            continue
        matched = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*[=!]~?", matchers))
        found.append((name, grouped | matched))
    return found


def grafana_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, as Prometheus would see it."""
    text = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    text = text.replace("$instance", ".*")
    assert "$" not in text, f"unhandled Grafana variable in {expr!r}"
    return text


def dashboard(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DASHBOARDS / f"{name}.json").read_text(encoding="utf-8"))
    return data


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def targets(board: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, query) for every panel query, template variable query and annotation."""
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", {"datasource": panel["datasource"], **target}
    for var in board["templating"]["list"]:
        query = var["query"]
        query = query if isinstance(query, dict) else {"rawSql": query}
        if var["datasource"]["type"] == "prometheus":
            # label_values(<series selector>, <label>): the selector is PromQL.
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query["query"])
            assert m, f"variable {var['name']!r}: {query['query']!r}"
            query = {"expr": m.group(1)}
        yield f"variable {var['name']!r}", {"datasource": var["datasource"], **query}
    for ann in board["annotations"]["list"]:
        if "target" in ann:
            yield f"annotation {ann['name']!r}", {"datasource": ann["datasource"], **ann["target"]}


def k8s(name: str) -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(K8S / name)
    return data


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = k8s("statefulset.yaml")["spec"]["template"]["spec"]
    return spec


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"no container {name!r}"
    result: dict[str, Any] = found[0]
    return result


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile():
        if word == "ENV":
            for m in re.finditer(r"([A-Z_][A-Z0-9_]*)=(\S+)", rest):
                env[m.group(1)] = m.group(2)
    return env


def k8s_config(tmp_path: Path) -> Config:
    """The configuration a pod of the StatefulSet gets: the ConfigMap's file and its env."""
    cm = k8s("configmap.yaml")
    secret = k8s("secret.example.yaml")["stringData"]
    spec = pod_spec()
    main = container(spec, "ingest")
    [key] = cm["data"]
    path = tmp_path / key
    path.write_text(cm["data"][key], encoding="utf-8")
    fields = {"metadata.name": "ingest-0", "metadata.namespace": "telemetry"}
    env: dict[str, str] = {}
    for item in main["env"]:
        if "value" in item:
            value = re.sub(r"\$\(([A-Z_]+)\)", lambda m: env[m.group(1)], item["value"])
        elif "fieldRef" in item["valueFrom"]:
            value = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            value = secret[item["valueFrom"]["secretKeyRef"]["key"]]
        env[item["name"]] = value
    env["INGEST_CONFIG"] = str(path)
    return config.load(env=env)


# ---------------------------------------------------------------- the image


def test_dockerfile_runs_the_cli_as_a_non_root_user_with_a_warm_numba_cache() -> None:
    steps = dockerfile()
    froms = [rest for word, rest in steps if word == "FROM"]
    args = dict(rest.split("=", 1) for word, rest in steps if word == "ARG" and "=" in rest)
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["ingest"]
    assert json.loads(dict(steps)["CMD"]) == ["run"]
    runtime = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM") :]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0].replace("${UID}", args.get("UID", ""))
    assert uid.isdigit(), "a numeric USER (Kubernetes runAsNonRoot checks it)"
    assert int(uid) != 0, "a non-root USER"
    assert int(uid) == pod_spec()["securityContext"]["runAsUser"]
    cache = dockerfile_env()["NUMBA_CACHE_DIR"]
    user_at = max(i for i, (w, _) in enumerate(runtime) if w == "USER")
    warm = [i for i, (w, rest) in enumerate(runtime) if w == "RUN" and "k.warm_up()" in rest]
    assert warm, "a RUN step warms the numba cache"
    assert warm[0] > user_at, "the cache is warmed as the runtime user (writable later)"
    assert any(w == "RUN" and cache in rest for w, rest in runtime), "the cache folder is created"
    exposed = [rest for word, rest in runtime if word == "EXPOSE"]
    assert exposed == [str(Metrics().port)]
    [health] = [rest for word, rest in runtime if word == "HEALTHCHECK"]
    assert "/healthz" in health
    assert "INGEST_METRICS_PORT" in health


def test_image_finds_the_schema() -> None:
    """The migrations ship inside the package, and the image's build checks it loads them."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = pyproject["tool"]["setuptools"]
    assert "ingest.schema" in setuptools["packages"]
    assert setuptools["package-dir"]["ingest.schema"] == "schema"
    assert setuptools["package-data"]["ingest.schema"] == ["*.sql"]
    assert [m.name for m in load_migrations(default_schema_dir())] == sorted(
        p.name for p in (ROOT / "schema").glob("*.sql")
    )
    text = "\n".join(f"{word} {rest}" for word, rest in dockerfile())
    assert "COPY schema/ schema/" in text
    assert "python -I -c 'from ingest.db.migrate import default_schema_dir, load_migrations" in text
    assert "site-packages" not in text, "nothing is copied in by hand"
    assert "cp " not in text, "nothing is copied in by hand"


def test_the_wheel_lists_every_subpackage() -> None:
    """setuptools builds the wheel from this explicit list: a subpackage missing from it is
    missing from the image, while the editable install used by the tests still finds it."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ingest").rglob("__init__.py")
    }
    found.discard("ingest.__pycache__")
    assert listed == found | {"ingest.schema"}


def test_dockerignore_admits_what_the_dockerfile_copies() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    rules = [x.strip() for x in lines if x.strip() and not x.startswith("#")]
    assert rules[0] == "*", "an allow-list: nothing enters the build context unless listed"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for word, rest in dockerfile():
        if word == "COPY" and "--from" not in rest:
            for source in rest.split()[:-1]:
                assert source.rstrip("/") in allowed, f"COPY {source} is excluded by .dockerignore"
    assert {".venv", ".stack", ".git"}.isdisjoint(allowed)


# ---------------------------------------------------------------- docker compose


COMPOSE_FILES = ["docker-compose.yml", "emqx/docker-compose.yml"]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(DEPLOY / "docker-compose.yml")
    return data


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_follows_the_compose_spec(name: str) -> None:
    run_tool(
        sys.executable,
        "-m",
        "check_jsonschema",
        "--builtin-schema",
        "vendor.compose-spec",
        DEPLOY / name,
    )


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_environment_names_are_settings(name: str) -> None:
    valid = valid_env_names()
    used = {
        key
        for service in load_yaml(DEPLOY / name)["services"].values()
        for key in service.get("environment", {})
        if key.startswith("INGEST_")
    }
    assert used, "the compose file configures the ingesters through INGEST_* variables"
    assert used <= valid, f"not settings: {sorted(used - valid)}"


@pytest.mark.parametrize("name", COMPOSE_FILES)
@pytest.mark.parametrize("service", ["ingest", "migrate"])
def test_compose_environment_is_a_valid_configuration(name: str, service: str) -> None:
    raw = load_yaml(DEPLOY / name)["services"][service]["environment"]
    env = {k: compose_value(v) for k, v in raw.items() if k.startswith("INGEST_")}
    cfg = config.load(env=env)
    assert urlsplit(cfg.db.url).username == "ingest", "the service connects as `ingest`"
    if service == "migrate":
        assert urlsplit(cfg.db.migrate_url).username == "telemetry_owner"


def test_compose_runs_three_ingesters_on_one_share_group(compose: dict[str, Any]) -> None:
    ingest = compose["services"]["ingest"]
    assert ingest["deploy"]["replicas"] == 3
    assert compose_value(ingest["environment"]["INGEST_MQTT_SHARE_GROUP"])
    assert "INGEST_MQTT_CLIENT_ID" not in ingest["environment"], "one id for 3 replicas"
    assert "container_name" not in ingest, "a fixed name prevents scaling"
    assert "ports" not in ingest, "a published port prevents scaling"
    assert ingest["command"] == ["run"]
    port = int(compose_value(ingest["environment"].get("INGEST_METRICS_PORT", Metrics().port)))
    assert port == Metrics().port
    assert str(port) in [str(p) for p in ingest["expose"]]
    grace = re.fullmatch(r"(\d+)s", ingest["stop_grace_period"])
    assert grace
    assert int(grace.group(1)) > Flush().shutdown_grace_s


def test_compose_migrates_once_before_the_ingesters(compose: dict[str, Any]) -> None:
    services = compose["services"]
    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["timescaledb"]["condition"] == "service_healthy"
    assert migrate.get("image") == services["ingest"].get("image")
    deps = services["ingest"]["depends_on"]
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert deps["timescaledb"]["condition"] == "service_healthy"
    assert deps["mosquitto"]["condition"] == "service_healthy"


def test_compose_database_and_its_roles(compose: dict[str, Any]) -> None:
    db = compose["services"]["timescaledb"]
    assert db["image"] == "timescale/timescaledb:latest-pg17"
    assert "timescaledb.license=timescale" in db["command"]
    env = db["environment"]
    init = [v for v in db["volumes"] if "/docker-entrypoint-initdb.d/" in v]
    assert init, "an init script gives the roles LOGIN and passwords"
    for volume in init:
        source, target = volume.split(":")[:2]
        assert not target.endswith("initdb.d/"), "mount files, not the folder (keeps the image's)"
        script = (DEPLOY / source).resolve()
        assert script.is_file(), volume
        text = script.read_text(encoding="utf-8")
        for role in ("telemetry_owner", "ingest", "analyst"):
            assert re.search(rf"CREATE ROLE {role} LOGIN", text), role
        required = re.search(r"for var in ([A-Z_ ]+); do", text)
        assert required
        for var in required.group(1).split():
            assert var in env, f"{var} is not passed to the database container"
    for name, value in env.items():
        if "PASSWORD" in name:
            assert re.fullmatch(r"\$\{[A-Z0-9_]+:-[^}]+\}", str(value)), f"{name}: ${{VAR:-...}}"
    urls = [
        str(v)
        for service in compose["services"].values()
        for v in service.get("environment", {}).values()
        if "://" in str(v)
    ]
    for url in urls:
        password = urlsplit(url.replace("${", "").replace("}", "")).password
        if password is not None:
            assert "${" in url, f"password in {url} is not a ${{VAR:-default}}"


def test_compose_broker_config(compose: dict[str, Any]) -> None:
    broker = compose["services"]["mosquitto"]
    conf_mount = next(v for v in broker["volumes"] if v.endswith("mosquitto.conf:ro"))
    conf = mosquitto_conf((DEPLOY / conf_mount.split(":")[0]).resolve())
    assert conf["persistence"] == ["true"]
    assert int(conf["max_packet_size"][0]) > Limits().max_payload_bytes
    [port] = [int(v.split()[0]) for v in conf["listener"]]
    url = urlsplit(compose_value(compose["services"]["ingest"]["environment"]["INGEST_MQTT_URL"]))
    assert (url.hostname, url.port) == ("mosquitto", port)
    assert f"{port}:{port}" in broker["ports"]


def mosquitto_conf(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            out.setdefault(key, []).append(value.strip())
    return out


async def test_broker_config_runs_mqtt5_and_passes_oversized_payloads(tmp_path: Path) -> None:
    """Mosquitto accepts the compose config, and a payload above the ingester's limit reaches a
    v5 subscriber (so the ingester can turn it into a dead letter)."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(binary, os.X_OK):
        pytest.fail("mosquitto is not installed: run the tests with 'make test'", pytrace=False)
    port = free_port()
    text = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text(encoding="utf-8")
    text = re.sub(r"(?m)^listener \d+.*$", f"listener {port} 127.0.0.1", text)
    text = re.sub(r"(?m)^persistence_location .*$", f"persistence_location {tmp_path}/", text)
    if os.geteuid() == 0:
        text += "\nuser root\n"  # else it drops to `mosquitto`, which cannot reach tmp_path
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text, encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        binary, "-c", str(conf), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        for _ in range(100):
            if proc.returncode is not None or await _accepts(port):
                break
            await asyncio.sleep(0.05)
        payload = os.urandom(Limits().max_payload_bytes * 2)
        problem = ""
        try:
            async with (
                asyncio.timeout(15),
                aiomqtt.Client(
                    "127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5, timeout=5
                ) as client,
            ):
                await client.subscribe("deploy-test/#", qos=1)
                await client.publish("deploy-test/big", payload, qos=1)
                async for message in client.messages:
                    assert message.payload == payload
                    break
        except (aiomqtt.MqttError, TimeoutError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
    finally:
        if proc.returncode is None:
            proc.terminate()
        output, _ = await proc.communicate()
    if problem:
        pytest.fail(
            f"a {len(payload)}-byte v5 message did not pass the compose broker config "
            f"({problem}); mosquitto said:\n{output.decode()}",
            pytrace=False,
        )


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


# ---------------------------------------------------------------- Prometheus


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    return data


def test_promtool_checks_the_prometheus_config() -> None:
    out = promtool("check", "config", DEPLOY / "prometheus" / "prometheus.yml")
    assert "1 rule files found" in out


def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    promtool("check", "rules", DEPLOY / "prometheus" / "alerts.yml")
    promtool("test", "rules", DEPLOY / "prometheus" / "alerts.test.yml")


def test_promtool_lints_the_live_exposition(exposition: str) -> None:
    promtool("check", "metrics", stdin=exposition)


def test_prometheus_scrapes_every_ingester_replica(
    prometheus: dict[str, Any], compose: dict[str, Any]
) -> None:
    [job] = [j for j in prometheus["scrape_configs"] if j["job_name"] == "ingest"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    [sd] = job["dns_sd_configs"]
    assert sd["names"] == ["ingest"]
    assert "ingest" in compose["services"]
    assert sd["type"] == "A"
    assert sd["port"] == Metrics().port
    mounts = compose["services"]["prometheus"]["volumes"]
    for rule_file in prometheus["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()
        assert f"./prometheus/{rule_file}:/etc/prometheus/{rule_file}:ro" in mounts


def alert_rules() -> list[dict[str, Any]]:
    data = load_yaml(DEPLOY / "prometheus" / "alerts.yml")
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_alert_rules_use_real_metrics_and_labels(exposition: str) -> None:
    names = sample_names(exposition) | {"up"}
    labels = label_names()
    rules = alert_rules()
    for rule in rules:
        used = promql_metrics(rule["expr"])
        assert used, f"{rule['alert']}: no metric in {rule['expr']!r}"
        for name, label_set in used:
            assert name in names, f"{rule['alert']}: {name} is not in the exposition"
            if name in labels:
                assert label_set <= labels[name], f"{rule['alert']}: {name} has no {label_set}"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]
    wanted = {
        "IngestDown", "IngestAllDown", "IngestNoDataFlowing", "IngestDeadLettersRising",
        "IngestInflightNearCap", "IngestDbRetries", "IngestCommitLagHigh",
    }  # fmt: skip
    assert wanted <= {rule["alert"] for rule in rules}


def test_inflight_alert_uses_the_deployed_caps(tmp_path: Path) -> None:
    [rule] = [r for r in alert_rules() if r["alert"] == "IngestInflightNearCap"]
    cfg = k8s_config(tmp_path)
    for cap in (cfg.flush.max_inflight_bytes, cfg.flush.max_inflight_readings):
        assert f"/ {cap} " in rule["expr"], f"{cap} not in {rule['expr']!r}"
    assert cfg.flush.max_inflight_bytes == Flush().max_inflight_bytes
    assert cfg.flush.max_inflight_readings == Flush().max_inflight_readings


# ---------------------------------------------------------------- Grafana


@pytest.fixture(scope="module")
def datasources() -> dict[str, dict[str, Any]]:
    data = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yml")
    return {ds["uid"]: ds for ds in data["datasources"]}


def test_grafana_datasources(
    datasources: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    prom = datasources["prometheus"]
    assert prom["type"] == "prometheus"
    assert urlsplit(prom["url"]).hostname in compose["services"]
    pg = datasources["timescaledb"]
    assert pg["type"] == "grafana-postgresql-datasource"
    host, _, port = pg["url"].partition(":")
    assert host in compose["services"]
    assert port == "5432"
    assert pg["user"] == "analyst", "Grafana reads as the read-only role"
    assert pg["jsonData"]["database"] == compose["services"][host]["environment"]["POSTGRES_DB"]
    variable = pg["secureJsonData"]["password"].lstrip("$").strip("{}")
    assert variable in compose["services"]["grafana"]["environment"]


def test_grafana_dashboards_are_provisioned(compose: dict[str, Any]) -> None:
    data = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml")
    [provider] = data["providers"]
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert {p.stem for p in DASHBOARDS.glob("*.json")} == {"operations", "plant"}


@pytest.mark.parametrize("name", ["operations", "plant"])
def test_dashboard_structure(name: str, datasources: dict[str, dict[str, Any]]) -> None:
    board = dashboard(name)
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    defined = {v["name"] for v in board["templating"]["list"]}
    for where, query in targets(board):
        ds = query["datasource"]
        assert ds["uid"] in datasources, where
        assert ds["type"] == datasources[ds["uid"]]["type"], where
        text = query.get("expr") or query.get("rawSql") or ""
        assert text, f"{where}: empty query"
        used = set(re.findall(r"\$(?!__)([A-Za-z_]\w*)", text))
        assert used <= defined, f"{where}: undefined variables {used - defined}"


def test_operations_dashboard_uses_real_metrics(exposition: str, tmp_path: Path) -> None:
    names = sample_names(exposition) | {"up"}
    labels = label_names()
    rules = []
    for i, (where, query) in enumerate(targets(dashboard("operations"))):
        assert query["datasource"]["uid"] == "prometheus", where
        expr = query["expr"]
        used = promql_metrics(expr)
        assert used, f"{where}: no metric in {expr!r}"
        for name, label_set in used:
            assert name in names, f"{where}: {name} is not in the exposition"
            if name in labels:
                assert label_set <= labels[name], f"{where}: {name} has no {label_set}"
        rules.append({"record": f"dashboard:query_{i}", "expr": grafana_promql(expr)})
    for family in ("ingest_publish_to_commit_seconds_bucket", "ingest_inflight_bytes",
                   "ingest_dead_letters_total", "ingest_db_retries_total",
                   "ingest_messages_acknowledged_total"):  # fmt: skip
        assert any(family in q["expr"] for _, q in targets(dashboard("operations"))), family
    # PromQL syntax, checked by Prometheus's own parser.
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", path)


PLANT_VIEWS = {"readings_v", "rollup_1m_v", "rollup_1h_v", "anomalies_v"}
FRAME_COLUMNS = {
    "time_series": {"time"},
    "annotation": {"time", "timeend", "text", "tags"},
}


def grafana_sql(sql: str) -> str:
    """A plant dashboard query as PostgreSQL would receive it from Grafana."""
    text = re.sub(
        r"\$__timeFilter\(([^)]+)\)",
        r"\1 BETWEEN '2024-01-01T00:00:00Z' AND '2024-01-02T00:00:00Z'",
        sql,
    )
    text = re.sub(
        r"\$__timeGroupAlias\(([^,]+),\s*'([^']+)'\)",
        lambda m: f"time_bucket('{m.group(2)}'::interval, {m.group(1)}) AS \"time\"",
        text,
    )
    text = re.sub(r"\$(device|sensor)\b", "'plant/line1/device1'", text)
    assert "$" not in text, f"unhandled Grafana macro in {sql!r}"
    return text


async def test_plant_dashboard_queries_run_as_the_analyst(database: Database) -> None:
    """Every SQL of the plant dashboard prepares against the migrated schema as `analyst`,
    and the time-series queries return the columns Grafana needs."""
    board = dashboard("plant")
    views = set()
    conn = await asyncpg.connect(database.analyst_url)
    try:
        for where, query in targets(board):
            sql = query["rawSql"]
            views.update(re.findall(r"\btelemetry\.(\w+)", sql))
            try:
                stmt = await conn.prepare(grafana_sql(sql))
                await stmt.fetch()
            except asyncpg.PostgresError as exc:
                pytest.fail(f"{where}: {exc}\n{sql}", pytrace=False)
            columns = {a.name for a in stmt.get_attributes()}
            kind = "annotation" if where.startswith("annotation") else query.get("format")
            wanted = FRAME_COLUMNS.get(str(kind), set())
            assert wanted <= columns, f"{where}: columns {sorted(columns)} lack {wanted - columns}"
    finally:
        await conn.close()
    assert views >= PLANT_VIEWS, f"the plant dashboard does not show {PLANT_VIEWS - views}"


# ---------------------------------------------------------------- Kubernetes


def k8s_manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_k8s_manifests_follow_the_kubernetes_schema() -> None:
    run_tool(
        sys.executable,
        "-m",
        "kubernetes_validate",
        "--strict",
        "--quiet",
        "-k",
        K8S_VERSION,
        *k8s_manifests(),
    )


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    kustomization = k8s("kustomization.yaml")
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in k8s_manifests() if not p.name.endswith(".example.yaml")}
    images = {i["name"] for i in kustomization["images"]}
    for name in ("statefulset.yaml", "migrate-job.yaml"):
        spec = k8s(name)["spec"]["template"]["spec"]
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["image"] in images, f"{name}: {c['image']} is not set by kustomization"


def test_k8s_environment_names_are_settings() -> None:
    valid = valid_env_names()
    used: set[str] = set()
    for path in k8s_manifests():
        doc = load_yaml(path)
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            used.update(e["name"] for e in c.get("env", []) if e["name"].startswith("INGEST_"))
    assert used, "the pods are configured through INGEST_* variables"
    assert used <= valid, f"not settings: {sorted(used - valid)}"


def test_k8s_pod_configuration_is_valid(tmp_path: Path) -> None:
    """The ConfigMap's file plus the pod's environment (secrets from the example) load, and
    hold no credentials themselves."""
    cfg = k8s_config(tmp_path)
    assert cfg.client_id == "telemetry.ingest-0", "client id from the pod's name"
    assert cfg.mqtt.share_group, "all replicas on one shared subscription"
    toml = tomllib.loads(next(iter(k8s("configmap.yaml")["data"].values())))
    assert "url" not in toml.get("db", {})
    assert "url" not in toml.get("mqtt", {})
    main = container(pod_spec(), "ingest")
    literals = [e.get("value", "") for e in main["env"]]
    assert not any("://" in v for v in literals), "URLs (with passwords) come from the Secret"
    by_name = {e["name"]: e for e in main["env"]}
    for name in ("INGEST_DB_URL", "INGEST_MQTT_URL"):
        ref = by_name[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == k8s("secret.example.yaml")["metadata"]["name"]


def test_k8s_client_id_is_stable_per_pod() -> None:
    spec = k8s("statefulset.yaml")
    assert spec["kind"] == "StatefulSet", "stable pod names keep the broker sessions"
    env = {e["name"]: e for e in container(spec["spec"]["template"]["spec"], "ingest")["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "$(POD_NAME)" in env["INGEST_MQTT_CLIENT_ID"]["value"]
    names = list(env)
    assert names.index("POD_NAME") < names.index("INGEST_MQTT_CLIENT_ID"), "$(VAR) order"


def test_k8s_ports_and_probes_match_the_service(tmp_path: Path) -> None:
    cfg = k8s_config(tmp_path)
    sts = k8s("statefulset.yaml")
    spec = sts["spec"]["template"]["spec"]
    main = container(spec, "ingest")
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"metrics": cfg.metrics.port}
    assert cfg.metrics.host == "0.0.0.0", "probes reach the pod's IP"
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(cfg.metrics.port)
    assert annotations["prometheus.io/path"] == "/metrics"
    probes = {k: main[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert all(p["port"] == "metrics" for p in probes.values())
    assert probes["startupProbe"]["path"] == probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    service = k8s("service.yaml")
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    [sport] = service["spec"]["ports"]
    assert sport["port"] == cfg.metrics.port
    assert sport["targetPort"] == "metrics"
    grace = spec["terminationGracePeriodSeconds"]
    assert cfg.mqtt.share_group
    assert cfg.mqtt.leave_on_stop
    assert grace > cfg.flush.shutdown_grace_s, "leaving the group and the final flush fit"


def test_k8s_numba_cache_is_writable_and_warm() -> None:
    spec = pod_spec()
    cache = dockerfile_env()["NUMBA_CACHE_DIR"]
    main = container(spec, "ingest")
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    [mount] = [m for m in main["volumeMounts"] if m["mountPath"] == cache]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mount["name"]]
    [init] = spec["initContainers"]
    [init_mount] = [m for m in init["volumeMounts"] if m["name"] == mount["name"]]
    assert f"cp -a {cache}/. {init_mount['mountPath']}/" in " ".join(init["command"])


def _quantity(text: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "m": 1e-3, "": 1}
    m = re.fullmatch(r"([\d.]+)(Ki|Mi|Gi|m|)", str(text))
    assert m, text
    return float(m.group(1)) * units[m.group(2)]


def test_k8s_resources_fit_the_targets() -> None:
    """About 300 MB resident and one core per ingester."""
    res = container(pod_spec(), "ingest")["resources"]
    assert _quantity(res["requests"]["cpu"]) == 1
    assert _quantity(res["requests"]["memory"]) >= 300e6
    assert _quantity(res["limits"]["memory"]) >= 2 * 300e6
    assert _quantity(res["limits"]["cpu"]) >= _quantity(res["requests"]["cpu"])


def test_k8s_autoscaler_and_disruption_budget_fit_the_statefulset() -> None:
    sts = k8s("statefulset.yaml")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = k8s("hpa.yaml")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": sts["metadata"]["name"],
    }
    assert hpa["minReplicas"] == sts["spec"]["replicas"] == 3
    assert hpa["maxReplicas"] > hpa["minReplicas"]
    # A removed pod leaves its share group on SIGTERM; scale down one pod at a time.
    down = hpa["behavior"]["scaleDown"]
    assert down.get("selectPolicy") != "Disabled"
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
    pdb = k8s("pdb.yaml")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["maxUnavailable"] == 1 < hpa["minReplicas"]


def test_k8s_drain_job_runs_the_drain_under_a_pods_client_id() -> None:
    job = k8s("drain-job.example.yaml")["spec"]["template"]["spec"]
    sts = k8s("statefulset.yaml")["spec"]["template"]["spec"]
    [drain] = job["containers"]
    [ingest] = sts["containers"]
    assert drain["args"][:2] == ["drain", "--client-id"]
    client_id = {e["name"]: e.get("value") for e in ingest["env"]}["INGEST_MQTT_CLIENT_ID"]
    assert drain["args"][2] == client_id.replace("$(POD_NAME)", "ingest-5")
    assert {e["name"] for e in drain["env"]} >= {
        "INGEST_CONFIG",
        "INGEST_DB_URL",
        "INGEST_MQTT_URL",
    }
    assert [v["name"] for v in job["volumes"]] == [v["name"] for v in sts["volumes"]]


def test_k8s_migration_job_uses_the_owner_url() -> None:
    job = k8s("migrate-job.yaml")["spec"]["template"]["spec"]
    main = container(job, "migrate")
    assert main["args"] == ["migrate"]
    env = {e["name"]: e for e in main["env"]}
    secret = k8s("secret.example.yaml")
    for name in ("INGEST_MIGRATE_DB_URL", "INGEST_DB_URL"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    owner = secret["stringData"][env["INGEST_MIGRATE_DB_URL"]["valueFrom"]["secretKeyRef"]["key"]]
    assert urlsplit(owner).username == "telemetry_owner"


# ---------------------------------------------------------------- probe paths, for real


async def _get(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    writer.close()
    await writer.wait_closed()
    return status


async def test_probe_paths_are_served() -> None:
    """The paths the image, compose and Kubernetes probe are the ones ingest.metrics serves:
    liveness answers before any connection exists, readiness only once connected."""
    main = container(pod_spec(), "ingest")
    live = {main["startupProbe"]["httpGet"]["path"], main["livenessProbe"]["httpGet"]["path"]}
    [health] = [rest for word, rest in dockerfile() if word == "HEALTHCHECK"]
    live.update(re.findall(r"(/\w+)'", health))
    ready = main["readinessProbe"]["httpGet"]["path"]
    health_state = metrics.Health()
    async with metrics.serve(host="127.0.0.1", port=free_port(), health=health_state) as port:
        for path in sorted(live):
            assert await _get(port, path) == 200, f"{path} must not depend on connections"
        assert await _get(port, ready) == 503
        health_state.broker = health_state.database = health_state.schema = True
        assert await _get(port, ready) == 200
        assert await _get(port, "/metrics") == 200
        assert await _get(port, "/no-such-path") == 404
