"""Private Mosquitto brokers: one test's own, on a free port, with its own configuration.

A test that restarts the broker, or needs TLS or passwords, gets one of these; the shared
stack's broker is never restarted. Logs go to a file (a pipe nobody reads would fill up and
stall the broker). As root the broker drops to the `mosquitto` user, so its folder (under
`process.service_dir()`) is given to that user.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from pathlib import Path

from tests.support import SupportError
from tests.support.certs import Certs
from tests.support.net import free_port
from tests.support.process import TIMEOUT, binary, give_to, wait_until


class PrivateBroker:
    """A Mosquitto broker of one test. `users` (name -> password) turns anonymous access off."""

    def __init__(
        self,
        base: Path,
        *,
        persistence: bool = False,
        certs: Certs | None = None,
        users: dict[str, str] | None = None,
        require_certificate: bool = False,
    ) -> None:
        self.dir = base / f"mqtt-{uuid.uuid4().hex[:6]}"
        self.dir.mkdir()
        self.port = free_port()
        self.certs = certs
        self.logfile = self.dir / "mosquitto.log"
        self.conf = self.dir / "mosquitto.conf"
        self.proc: asyncio.subprocess.Process | None = None
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"log_dest file {self.logfile}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "max_packet_size 8388608",
            "max_inflight_messages 0",
            "max_queued_messages 10000000",
            "max_queued_bytes 0",
        ]
        if persistence:
            # Saved on a clean shutdown (SIGTERM), and every second while running.
            lines += [
                "persistence true",
                f"persistence_location {self.dir}/",
                "autosave_interval 1",
            ]
        if certs is not None:
            lines += [f"cafile {certs.ca}", f"certfile {certs.cert}", f"keyfile {certs.key}"]
            if require_certificate:  # clients must show a certificate signed by certs.ca
                lines.append("require_certificate true")
        if users is not None:
            passwd = self.dir / "passwd"
            passwd.touch()  # no user at all: nobody gets in
            tool = binary("mosquitto_passwd", "/usr/bin", "/usr/sbin")
            for n, (user, password) in enumerate(users.items()):
                create = ["-c"] if n == 0 else []
                subprocess.run(
                    [tool, "-b", *create, str(passwd), user, password],
                    check=True,
                    capture_output=True,
                    timeout=TIMEOUT,
                )
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        self.conf.write_text("\n".join(lines) + "\n")

    def url(self, *, user: str | None = None, password: str | None = None) -> str:
        scheme = "mqtts" if self.certs is not None else "mqtt"
        host = "localhost" if self.certs is not None else "127.0.0.1"
        auth = f"{user}:{password}@" if user is not None else ""
        return f"{scheme}://{auth}{host}:{self.port}"

    async def start(self) -> None:
        """Start it (again, after `stop`) and wait until it accepts connections."""
        if self.certs is not None:
            give_to("mosquitto", self.certs.ca.parent)
        give_to("mosquitto", self.dir)
        self.proc = await asyncio.create_subprocess_exec(
            binary("mosquitto", "/usr/sbin", "/usr/local/sbin"),
            "-c",
            str(self.conf),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

        async def listening() -> bool:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise SupportError(f"mosquitto exited with {self.proc.returncode}: {self.log()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            writer.close()
            return True

        await wait_until(listening, timeout=TIMEOUT, every=0.05)

    async def stop(self) -> None:
        """SIGTERM: a clean shutdown, which writes the persistence file."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(TIMEOUT):
                await self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
