"""A real syslog daemon for tests: Debian's rsyslogd on a private socket in a temporary folder
(never the system's /dev/log, no network), writing what it receives to files there.

    with Rsyslog(tmp_path / "syslog") as syslog:
        ... [log] target = "syslog", syslog_socket = str(syslog.socket) ...
        syslog.lines()    # ["mail.info mailgate[123]: 6AOJL6hk004507: from=<a@b>, ...", ...]

``all.log`` has every message as ``facility.severity tag: text`` (an rsyslog template), and
``maillog`` what the syslog.conf line ``mail.debug <maillog>`` selects, as an admin writes it.
``stop()`` / ``start()`` stop and start the daemon (it removes its socket and makes it again);
``freeze()`` / ``thaw()`` stop it reading (SIGSTOP) and let it go on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path
from types import TracebackType

from tests.support.wait import wait_until

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"

CONFIG = """\
global(workDirectory="{dir}/work")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{dir}/log")
template(name="facility_severity" type="string"
         string="%syslogfacility-text%.%syslogseverity-text% %syslogtag%%msg%\\n")
*.* action(type="omfile" file="{dir}/all.log" template="facility_severity")
mail.debug {dir}/maillog
"""


class Rsyslog:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        (self.dir / "work").mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "rsyslog.conf"
        self.conf.write_text(CONFIG.format(dir=self.dir))
        self.socket = self.dir / "log"
        self.all_log = self.dir / "all.log"
        self.maillog = self.dir / "maillog"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Rsyslog:
        with open(self.dir / "rsyslogd.err", "ab") as err:
            self.proc = subprocess.Popen(
                [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.dir / "rsyslogd.pid")],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        wait_until(self.socket.exists, "rsyslogd's socket", 10)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.thaw()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        self.proc = None

    def freeze(self) -> None:
        """Returns once every thread has stopped: a reader thread the signal wakes takes one
        more datagram if one came in before it was scheduled, which would leave one place in
        a socket the test then fills."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        wait_until(lambda: self._thread_states() <= {"T", "t"}, "every rsyslogd thread stopped")

    def _thread_states(self) -> set[str]:
        assert self.proc is not None
        states = set()
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
                # The state follows the command name in parentheses, which may hold blanks.
                states.add((task / "stat").read_text().rpartition(")")[2].split()[0])
        return states

    def thaw(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def lines(self) -> list[str]:
        """Every message received, as ``facility.severity tag: text``."""
        try:
            return self.all_log.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []

    def __enter__(self) -> Rsyslog:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
