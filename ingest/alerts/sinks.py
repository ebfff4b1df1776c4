"""Alert sinks: map a notification to a destination's format and send it once.

A sink never retries by itself: it answers with an `Outcome` (delivered, retry, or failed for
good) and the dispatcher schedules what follows. Each `send` is called from one task at a time
per notification, possibly concurrently for different alerts.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol
from urllib.parse import unquote, urlsplit

import aiomqtt
import httpx

from ingest.alerts.rules import (
    CloudEventsSink,
    MqttSink,
    PagerDutySink,
    ServiceNowSink,
    SinkConfig,
    rank,
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one attempt."""

    result: Literal["delivered", "retry", "failed"]
    error: str = ""
    retry_after_s: float | None = None  # the receiver's Retry-After, when it gave one


class Sink(Protocol):
    name: str

    async def send(self, note: dict[str, Any]) -> Outcome: ...

    async def aclose(self) -> None: ...


def retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def classify(response: httpx.Response) -> Outcome:
    """2xx delivered; 429 retried after Retry-After; any other 4xx failed; else retried."""
    code = response.status_code
    if 200 <= code < 300:
        return Outcome("delivered")
    error = f"HTTP {code}"
    if code == 429:
        return Outcome("retry", error, retry_after(response.headers.get("retry-after")))
    if 400 <= code < 500:
        return Outcome("failed", error)
    return Outcome("retry", error)


class _HttpSink:
    """A sink that POSTs one JSON document per notification."""

    def __init__(self, name: str, client: httpx.AsyncClient) -> None:
        self.name = name
        self._client = client

    def request(self, note: dict[str, Any]) -> tuple[str, dict[str, str], bytes, Any]:
        raise NotImplementedError

    async def send(self, note: dict[str, Any]) -> Outcome:
        url, headers, body, auth = self.request(note)
        try:
            response = await self._client.post(url, content=body, headers=headers, auth=auth)
        except httpx.TimeoutException:
            return Outcome("retry", "timed out")
        except httpx.TransportError as exc:
            return Outcome("retry", f"{type(exc).__name__}: {exc}"[:200])
        return classify(response)

    async def aclose(self) -> None:
        return None


class CloudEvents(_HttpSink):
    """CloudEvents 1.0 in structured mode: the whole event is the JSON body."""

    def __init__(self, cfg: CloudEventsSink, client: httpx.AsyncClient) -> None:
        super().__init__(cfg.name, client)
        self.cfg = cfg

    def request(self, note: dict[str, Any]) -> tuple[str, dict[str, str], bytes, Any]:
        event = {
            "specversion": "1.0",
            "id": note["id"],
            "source": self.cfg.source,
            "type": f"{self.cfg.type_prefix}.{note['event']}",
            "subject": note["device"],
            "time": note["at"],
            "datacontenttype": "application/json",
            "data": note,
        }
        headers = {**self.cfg.headers, "content-type": "application/cloudevents+json"}
        return self.cfg.url, headers, json.dumps(event).encode(), None


# ServiceNow's severities: 1 critical, 2 major, 3 minor, 4 warning, 5 info; 0 clears.
SN_SEVERITY = {"critical": "1", "major": "2", "minor": "3", "warning": "4", "info": "5"}


def servicenow_record(note: dict[str, Any], *, source: str) -> dict[str, str]:
    """One Event Management record (every value a string, as the table API takes them)."""
    at = datetime.fromisoformat(note["at"].replace("Z", "+00:00")).astimezone(UTC)
    resolved = note["event"] == "resolved"
    sensors = ", ".join(note["sensors"])
    info = {
        "ci_id": note["ci_id"] or "",
        "asset_path": note["device"],
        "asset": note["asset"] or "",
        "priority": str(note["priority"]),
        "criticality": str(note["criticality"]),
        "state": note["state"],
        "team": note["team"] or "",
        "notification_id": note["id"],
    }
    return {
        "source": source,
        "node": note["device"],
        "type": note["condition"],
        "resource": sensors or note["device"].rsplit("/", 1)[-1],
        "metric_name": note["condition"],
        "message_key": note["key"],
        "severity": "0" if resolved else SN_SEVERITY[note["severity"]],
        "time_of_event": at.strftime("%Y-%m-%d %H:%M:%S"),
        "description": (
            f"{note['condition']} on {note['device']} {note['event']}"
            f" (severity {note['severity']}, priority {note['priority']}"
            + (f", sensors {sensors})" if sensors else ")")
        ),
        "additional_info": json.dumps(info, sort_keys=True),
    }


class ServiceNow(_HttpSink):
    """ServiceNow Event Management's inbound web service (`/api/global/em/jsonv2`)."""

    def __init__(self, cfg: ServiceNowSink, client: httpx.AsyncClient) -> None:
        super().__init__(cfg.name, client)
        self.cfg = cfg
        self._url = cfg.url.rstrip("/") + "/api/global/em/jsonv2"

    def request(self, note: dict[str, Any]) -> tuple[str, dict[str, str], bytes, Any]:
        body = {"records": [servicenow_record(note, source=self.cfg.source)]}
        auth = httpx.BasicAuth(self.cfg.username, self.cfg.password) if self.cfg.username else None
        headers = {"content-type": "application/json", "accept": "application/json"}
        return self._url, headers, json.dumps(body).encode(), auth


PD_SEVERITY = {
    "critical": "critical",
    "major": "error",
    "minor": "warning",
    "warning": "warning",
    "info": "info",
}


class PagerDuty(_HttpSink):
    """PagerDuty Events API v2: trigger (opened, updated, flapping) and resolve."""

    def __init__(self, cfg: PagerDutySink, client: httpx.AsyncClient) -> None:
        super().__init__(cfg.name, client)
        self.cfg = cfg

    def request(self, note: dict[str, Any]) -> tuple[str, dict[str, str], bytes, Any]:
        body: dict[str, Any] = {
            "routing_key": self.cfg.routing_key,
            "event_action": "resolve" if note["event"] == "resolved" else "trigger",
            "dedup_key": note["key"],
        }
        if note["event"] != "resolved":
            body["payload"] = {
                "summary": f"{note['condition']} on {note['device']} ({note['state']})",
                "source": note["device"],
                "severity": PD_SEVERITY[note["severity"]],
                "timestamp": note["at"],
                "component": ", ".join(note["sensors"]) or None,
                "group": note["asset"],
                "class": note["condition"],
                "custom_details": note,
            }
        return self.cfg.url, {"content-type": "application/json"}, json.dumps(body).encode(), None


class Mqtt:
    """Retained messages per alert: the open alert's JSON, an empty message once resolved.

    One aiomqtt client, connected on first use and again after an error; publishes at QoS 1
    and returns when the broker acknowledged.
    """

    def __init__(self, cfg: MqttSink, *, timeout_s: float) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self._timeout = timeout_s
        self._client: aiomqtt.Client | None = None
        self._stack = contextlib.AsyncExitStack()

    def topic(self, note: dict[str, Any]) -> str:
        return f"{self.cfg.topic_prefix}/{note['device']}/{note['condition']}"

    async def _connect(self) -> aiomqtt.Client:
        if self._client is not None:
            return self._client
        parts = urlsplit(self.cfg.url)
        tls = ssl.create_default_context() if parts.scheme == "mqtts" else None
        client = aiomqtt.Client(
            parts.hostname or "127.0.0.1",
            parts.port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            identifier=self.cfg.client_id or None,
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=tls,
            timeout=self._timeout,
        )
        await self._stack.enter_async_context(client)
        self._client = client
        return client

    async def send(self, note: dict[str, Any]) -> Outcome:
        resolved = note["event"] == "resolved"
        payload = b"" if resolved else json.dumps(note).encode()
        try:
            client = await self._connect()
            await client.publish(
                self.topic(note), payload, qos=1, retain=True, timeout=self._timeout
            )
        except (aiomqtt.MqttError, OSError) as exc:
            await self.aclose()
            return Outcome("retry", f"MQTT: {exc}"[:200])
        return Outcome("delivered")

    async def aclose(self) -> None:
        self._client = None
        stack, self._stack = self._stack, contextlib.AsyncExitStack()
        with contextlib.suppress(aiomqtt.MqttError, OSError):
            await stack.aclose()


def build(cfgs: tuple[SinkConfig, ...], *, timeout_s: float) -> tuple[dict[str, Sink], Any]:
    """The configured sinks by name, and the HTTP client they share (to close at the end)."""
    client = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
    out: dict[str, Sink] = {}
    for cfg in cfgs:
        if isinstance(cfg, CloudEventsSink):
            out[cfg.name] = CloudEvents(cfg, client)
        elif isinstance(cfg, ServiceNowSink):
            out[cfg.name] = ServiceNow(cfg, client)
        elif isinstance(cfg, PagerDutySink):
            out[cfg.name] = PagerDuty(cfg, client)
        else:
            out[cfg.name] = Mqtt(cfg, timeout_s=timeout_s)
    return out, client


__all__ = ["Outcome", "Sink", "build", "classify", "rank", "retry_after", "servicenow_record"]
