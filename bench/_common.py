"""What the benchmark scripts share: child processes that announce their URL, a free local
port, and replacing one ``## `` section of BENCHMARKS.md.

The scripts run as ``python bench/NAME.py``, which puts this folder on ``sys.path``; that is
how they import this module.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: what a child prints once it is listening
URL_RE = re.compile(rb"http://[0-9.]+:[0-9]+")
#: an SSE chunk carrying content: its arrival is the time to first token
FIRST_CONTENT = re.compile(rb'"content": ?"[^"]')


def free_port() -> int:
    """A local port nothing listens on (the OS's pick, released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process that prints its URL on stdout once it is listening.

    Its stderr goes to ``log_dir/NAME.log``, so a failed start can point at the reason.
    """

    def __init__(self, name: str, argv: list[str], log_dir: Path, *,
                 start_timeout: float = 20.0, stop_timeout: float = 10.0) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self._stop_timeout = stop_timeout
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log,
                                  stdin=subprocess.DEVNULL, cwd=log_dir)
        self.url = self._wait_for_url(start_timeout)

    def _wait_for_url(self, timeout: float) -> str:
        assert self.p.stdout is not None
        fd = self.p.stdout.fileno()
        seen = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                piece = os.read(fd, 4096)
                if not piece:
                    break
                seen += piece
                m = URL_RE.search(seen)
                if m:
                    return m.group(0).decode()
            elif self.p.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"{self.name} did not start; stdout {seen!r}; see {self.log_path}")

    @property
    def pid(self) -> int:
        return self.p.pid

    def cpu_seconds(self) -> float:
        """utime + stime of the process (all threads), in seconds."""
        raw = Path(f"/proc/{self.pid}/stat").read_text()
        fields = raw[raw.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        """SIGINT (a clean shutdown flushes what the child still holds), then kill."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(self._stop_timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        if self.p.stdout is not None:
            self.p.stdout.close()
        self._log.close()


def replace_section(section: str, path: Path = BENCHMARKS, *,
                    new_file: str = "# Benchmarks\n") -> None:
    """Replace the section whose heading is ``section``'s first line (up to the next ``## ``
    heading), or append it; every other section is left as it is.

    Several benchmarks write the same file, so it is re-read right before writing and swapped
    in atomically. ``new_file`` starts the file when it is missing or empty.
    """
    heading = section.split("\n", 1)[0].rstrip()
    text = path.read_text() if path.exists() else ""
    if not text.strip():
        text = new_file
    m = re.search(rf"^{re.escape(heading)}[ \t]*$", text, flags=re.M)
    if m:
        nxt = re.search(r"^## ", text[m.end():], flags=re.M)
        end = m.end() + nxt.start() if nxt else len(text)
        tail = text[end:]
        text = text[:m.start()] + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    if not text.endswith("\n"):
        text += "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
