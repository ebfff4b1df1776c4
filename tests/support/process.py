"""Child processes and commands: output kept, deadlines on everything, stopped with a grace.

The private servers' helpers are here too: as root, PostgreSQL and Mosquitto run as their own
unprivileged users (`as_user`, `give_to`), in a folder those users can reach (`service_dir`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TypeVar

from tests.support import SupportError
from tests.support.stack import ROOT

T = TypeVar("T")
TIMEOUT = 60.0


class Child:
    """A child process; its stderr kept in memory, or in the file `log` when given.

    With `own_group` it runs in a process group of its own, so that a terminal's Ctrl-C
    reaches only its parent, which then stops it (and whatever it started) on its own terms.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str],
        log: Path | None = None,
        own_group: bool = False,
        stdout: bool = False,
    ) -> None:
        self.name, self.argv, self.env, self.log = name, list(argv), env, log
        self.own_group, self.stdout = own_group, stdout
        self.proc: asyncio.subprocess.Process | None = None
        self._output = bytearray()
        self._reader: asyncio.Task[None] | None = None
        self._log_file: IO[bytes] | None = None

    async def start(self) -> Child:
        stderr: int | IO[bytes] = asyncio.subprocess.PIPE
        if self.log is not None:
            self._log_file = stderr = self.log.open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if self.stdout else asyncio.subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=self.own_group,
        )
        if self.log is None:
            self._reader = asyncio.create_task(self._read(), name=f"{self.name} stderr")
        return self

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self._output += chunk

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def output(self) -> bytes:
        """Its stderr so far."""
        if self.log is None:
            return bytes(self._output)
        try:
            return self.log.read_bytes()
        except OSError:
            return b""

    def tail(self, lines: int = 3) -> str:
        """The last lines of its stderr, as a suffix for an error message."""
        text = self.output.decode(errors="replace").strip().splitlines()
        last = [line.strip() for line in text if line.strip()][-lines:]
        return f" (last output: {' | '.join(last)})" if last else ""

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            raise SupportError(
                f"{self.name} exited with status {self.proc.returncode}{self.tail()}"
            )

    async def wait(self, *, timeout: float, doing: str = "") -> int:  # noqa: ASYNC109
        """Its exit status, once its output is read to the end; fails after `timeout` s."""
        assert self.proc is not None
        try:
            async with asyncio.timeout(timeout):
                code = await self.proc.wait()
                if self._reader is not None:
                    await self._reader
        except TimeoutError:
            what = f" {doing}" if doing else ""
            raise SupportError(
                f"{self.name} did not finish{what} within {timeout:.0f}s{self.tail()}"
            ) from None
        self._close_log()
        return code

    async def readline(self, *, timeout: float, doing: str) -> str:  # noqa: ASYNC109
        """The next line of its stdout (started with `stdout`)."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=timeout)
        except TimeoutError:
            raise SupportError(
                f"{self.name}: no {doing} within {timeout:.0f}s{self.tail()}"
            ) from None
        if not line:
            await self.wait(timeout=10, doing="exiting")
            self.check_alive()
            raise SupportError(f"{self.name} ended its output before {doing}{self.tail()}")
        return line.decode().strip()

    def signal(self, sig: int) -> None:
        """Send `sig` to it (to its whole group with `own_group`), if it still runs."""
        if not self.running:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.own_group:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)

    async def stop(self, *, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; its exit status (None if never started)."""
        if self.proc is None:
            self._close_log()
            return None
        self.signal(signal.SIGTERM)
        try:
            return await self.wait(timeout=grace, doing="stopping")
        except SupportError:
            self.signal(signal.SIGKILL)
            return await self.wait(timeout=TIMEOUT, doing="after SIGKILL")

    async def kill(self) -> None:
        """SIGKILL: no flush, no goodbye."""
        assert self.proc is not None
        self.signal(signal.SIGKILL)
        await self.wait(timeout=TIMEOUT, doing="after SIGKILL")

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


async def wait_until(
    predicate: Callable[[], Awaitable[T]],
    *,
    timeout: float = 30.0,  # noqa: ASYNC109 - a polling deadline
    every: float = 0.1,
) -> T:
    """Poll an async predicate until it returns a truthy value; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise SupportError(f"condition not met within {timeout}s (last value: {value!r})")
        await asyncio.sleep(every)


async def run(argv: Sequence[str], *, what: str) -> str:
    """Run a command to completion (bounded); fail with its output if it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(TIMEOUT):
        out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise SupportError(f"{what} failed with exit status {proc.returncode}: {text}")
    return text


def binary(name: str, *extra_dirs: str) -> str:
    """The path of an installed program, also looked for in `extra_dirs` (sbin folders)."""
    found = shutil.which(name) or shutil.which(name, path=":".join(extra_dirs))
    if found is None:
        raise SupportError(
            f"{name} is not installed: 'deploy/local/stack up' installs the test servers"
        )
    return found


def is_root() -> bool:
    return os.geteuid() == 0


def as_user(user: str, argv: Sequence[str]) -> list[str]:
    """`argv` run as the service user when the tests run as root (servers refuse root)."""
    return ["runuser", "-u", user, "--", *argv] if is_root() else list(argv)


def give_to(user: str, path: Path) -> None:
    """Make `path` (recursively) owned by `user` when running as root."""
    if not is_root():
        return
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


@contextlib.contextmanager
def service_dir() -> Iterator[Path]:
    """A fresh folder the `postgres` and `mosquitto` users can traverse; removed afterwards.

    (pytest's tmp_path sits below a 0700 folder of the user running the tests.)
    """
    path = Path(tempfile.mkdtemp(prefix="ingest-test-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
