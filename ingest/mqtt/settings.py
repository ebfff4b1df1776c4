"""[mqtt]: the broker, the session and the subscription, as one Struct validated once."""

from __future__ import annotations

import re
import socket
import ssl
from typing import Final, NamedTuple
from urllib.parse import SplitResult, unquote, urlsplit

import msgspec

from ingest.errors import ConfigError

_DEFAULT_PORTS: Final = {"mqtt": 1883, "mqtts": 8883}
_LEVEL: Final = r"[A-Za-z0-9_.:-]{1,64}"


class SettingError(ConfigError, ValueError):
    """A bad ``[mqtt]`` value; the message starts with ``mqtt.<key>: ``.

    A ValueError too, so that msgspec reports it with its place when the whole configuration
    is converted (``ingest.config`` adds the environment variable's name).
    """


def _bad(key: str, reason: str) -> SettingError:
    return SettingError(f"mqtt.{key}: {reason}")


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """[mqtt]: the broker, the session and the subscription. Empty strings mean "not set"."""

    url: str = "mqtt://127.0.0.1:1883"
    """``mqtt://[user:pass@]host[:port]`` or ``mqtts://...`` (default ports 1883 and 8883)."""
    client_id: str = ""
    """Stable across restarts of one instance: it names the broker-side persistent session.
    Empty: ``ingest-<host name>`` (see ``session_client_id``)."""
    topic_prefix: str = "telemetry"
    share_group: str = ""
    """Subscribe as ``$share/<group>/<prefix>/#`` so that the instances split the messages."""
    receive_maximum: int = 4000
    """MQTT v5 Receive Maximum: the most unacknowledged QoS 1 messages the broker may send.
    It also bounds the messages handed to the pipeline and not yet acknowledged, so a flush
    gathers at most about half of it while the one before is written: with small messages (a
    plant's 20 samples each) it decides how large the flushes are."""
    session_expiry_s: int = 3600
    """How long the broker keeps the session (and queues messages) while disconnected."""
    leave_on_stop: bool = True
    """With a ``share_group``: on SIGTERM, unsubscribe first, finish and acknowledge what is
    in hand, then end the session, so the broker stops routing this member's share to it.
    False, or without a share group: the session stays for the next start."""
    keepalive_s: int = 30
    timeout_s: float = 10.0
    """Wait this long for the connection, CONNACK, SUBACK, UNSUBACK and a clean disconnect."""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_insecure: bool = False
    """Skip the server host name check (the certificate chain is still verified)."""
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0

    def __post_init__(self) -> None:
        endpoint = parse_url(self.url)
        if self.client_id and not re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", self.client_id):
            raise _bad("client_id", "must be 1-128 characters from A-Z a-z 0-9 _ . : -")
        if not re.fullmatch(rf"{_LEVEL}(/{_LEVEL})*", self.topic_prefix):
            raise _bad(
                "topic_prefix",
                "must be topic levels of 1-64 characters from A-Z a-z 0-9 _ . : - separated by /",
            )
        if self.share_group and not re.fullmatch(_LEVEL, self.share_group):
            raise _bad("share_group", "must be 1-64 characters from A-Z a-z 0-9 _ . : -")
        if not 1 <= self.receive_maximum <= 65535:
            raise _bad("receive_maximum", "must be between 1 and 65535")
        if not 0 <= self.session_expiry_s <= 0xFFFFFFFF:
            raise _bad("session_expiry_s", "must be between 0 and 4294967295")
        if not 1 <= self.keepalive_s <= 65535:
            raise _bad("keepalive_s", "must be between 1 and 65535")
        if not self.timeout_s > 0:
            raise _bad("timeout_s", "must be > 0")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise _bad("reconnect_min_s", "must be > 0 and <= mqtt.reconnect_max_s")
        if not endpoint.tls:
            for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
                if getattr(self, key):
                    raise _bad(key, "set, but mqtt.url is not mqtts://")
            if self.tls_insecure:
                raise _bad("tls_insecure", "set, but mqtt.url is not mqtts://")
        if self.tls_key_file and not self.tls_cert_file:
            raise _bad("tls_key_file", "set without mqtt.tls_cert_file")

    def __repr__(self) -> str:
        # Never print the password that the URL may carry.
        return f"Settings(url={parse_url(self.url).redacted!r}, client_id={self.client_id!r}, ...)"

    @property
    def session_client_id(self) -> str:
        """The client id to connect with: ``client_id``, else one derived from the host name."""
        if self.client_id:
            return self.client_id
        host = re.sub(r"[^A-Za-z0-9_.:-]", "-", socket.gethostname())[:100] or "host"
        return f"ingest-{host}"

    @property
    def topic_filter(self) -> str:
        """What the source subscribes to."""
        prefix_filter = f"{self.topic_prefix}/#"
        if not self.share_group:
            return prefix_filter
        return f"$share/{self.share_group}/{prefix_filter}"


class Endpoint(NamedTuple):
    """Where ``mqtt.url`` points, with its credentials."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None
    redacted: str
    """The URL without its password, for log lines and errors."""


def parse_url(url: str) -> Endpoint:
    """The endpoint of ``mqtt[s]://[user:pass@]host[:port]``; SettingError if it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _bad("url", f"not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise _bad("url", "must start with mqtt:// or mqtts://")
    if not parts.hostname:
        raise _bad("url", "no host name")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _bad("url", "must be mqtt[s]://[user:pass@]host[:port], nothing after it")
    if port == 0:
        raise _bad("url", "port 0")
    port = port or _DEFAULT_PORTS[scheme]
    return Endpoint(
        host=parts.hostname,
        port=port,
        tls=scheme == "mqtts",
        username=None if parts.username is None else unquote(parts.username),
        password=None if parts.password is None else unquote(parts.password),
        redacted=_redact(parts, scheme=scheme, port=port),
    )


def _redact(parts: SplitResult, *, scheme: str, port: int) -> str:
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    user = "" if parts.username is None else f"{parts.username}:***@"
    return f"{scheme}://{user}{host}:{port}"


def tls_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of ``settings`` (blocking file reads: call it in a thread)."""
    try:
        context = ssl.create_default_context(cafile=settings.tls_ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"mqtt.tls_ca_file: cannot load {settings.tls_ca_file!r}: {exc}") from exc
    if settings.tls_cert_file:
        try:
            context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"mqtt.tls_cert_file: cannot load {settings.tls_cert_file!r} "
                f"(key {settings.tls_key_file!r}): {exc}"
            ) from exc
    if settings.tls_insecure:
        context.check_hostname = False
    return context
