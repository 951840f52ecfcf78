"""The CLI as a user runs it, in a child process, with its exit code always checked.

`run` runs a verb to its end and fails the test unless it exited with `expect` (0 unless the test says otherwise:
a refusal is asserted as a refusal, never ignored). `service` starts a long-running verb (ingest, cleanup, watch,
reconcile --every) and, when the block ends, stops it with SIGTERM as systemd does and fails the test unless it
exited 0 within 30 s (a verb that died early, or stopped with another code, is a failure even if the block passed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

STOP_WITHIN = 30.0  # seconds a verb has to exit after SIGTERM


def command(*args: str, config: Path | str | None = None) -> list[str]:
    return [sys.executable, "-m", "injector.cli", *(["--config", str(config)] if config else []), *args]


def _env(env: Mapping[str, str] | None) -> dict[str, str] | None:
    return None if env is None else {**os.environ, **env}


def run(*args: str, config: Path | str | None = None, env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None, expect: int = 0, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `rucio-injector [--config C] ARGS` to its end; fail unless it exited `expect`. `env` adds to os.environ."""
    done = subprocess.run(command(*args, config=config), env=_env(env), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == expect, (f"`rucio-injector {' '.join(args)}` exited {done.returncode}, expected "
                                       f"{expect}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
    return done


class Service:
    """A running verb: `proc`, and its stderr so far (`err()`)."""

    def __init__(self, proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
        self.proc, self._log = proc, log
        self._final: str | None = None  # its whole stderr, kept once it has exited (the temp file is gone then)

    def err(self) -> str:
        if self._final is not None:
            return self._final
        self._log.flush()
        text = Path(self._log.name).read_text(errors="replace")
        if self.proc.poll() is not None:
            self._final = text
        return text

    def stop(self, expect: int = 0) -> None:
        """SIGTERM, then fail unless it exits `expect` within STOP_WITHIN (or had already exited `expect`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_WITHIN)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"still running {STOP_WITHIN:.0f} s after SIGTERM\n{self.err()}") from None
        self.err()
        assert code == expect, f"exited {code}, expected {expect}\n--- stderr\n{self.err()}"


@contextmanager
def service(*args: str, config: Path | str | None = None, env: Mapping[str, str] | None = None,
            log: Path | None = None, expect: int = 0) -> Iterator[Service]:
    """Start `rucio-injector ARGS` (its stderr to `log`, a temp file by default); when the block ends, SIGTERM it
    and check it exits `expect` (default 0). A block that fails keeps its own failure; the process is stopped
    (killed if it must be) either way."""
    with (open(log, "w+b") if log else tempfile.NamedTemporaryFile(prefix="rucio-injector-", suffix=".log")) as err:
        proc = subprocess.Popen(command(*args, config=config), env=_env(env), stdout=subprocess.DEVNULL, stderr=err)
        running = Service(proc, err)
        try:
            yield running
        except BaseException:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            running.err()
            raise
        running.stop(expect)
