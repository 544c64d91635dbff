"""Real Sendmail 8.17 (Debian's package, unpacked by ``.ci/sendmail-tree``) as an oracle.

`SendmailBuild` builds sendmail.cf from an mc with the package's m4 and cf/ tree, turns the
tables into hash maps with its makemap, and asks ``sendmail -bt`` (address test mode: no
daemon, no root setup) for decisions: ``/parse`` routes, ``check_rcpt`` relay verdicts,
``greet_pause``. The mc is the admin's, with only its file locations changed (``/etc/mail/`` →
the private folder) and a prelude of test-only defines in front: the folder, no DNS (a
service switch of ``hosts files``), and $j. Sendmail sleeps 60 s when the host name has no
domain, so each run gets a UTS namespace with the name ``gateway.example.com``.

``daemon(port)`` runs ``sendmail -bD``; with ``syslog=`` (an `tests.support.syslogd.Rsyslog`
socket) its maillog lines go to that syslog daemon, through a /dev/log of its own in a mount
namespace, for tests that compare its lines with ours.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TREE = Path(os.environ.get("MAILGATE_SENDMAIL_TREE", "/opt/mailgate-ci/sendmail"))
SENDMAIL = TREE / "usr/libexec/sendmail/sendmail"
MAKEMAP = TREE / "usr/libexec/sendmail/makemap"
M4 = TREE / "usr/bin/m4"
CF_DIR = TREE / "usr/share/sendmail/cf"
HOSTNAME = "gateway.example.com"
MAP_TABLES = ("access", "mailertable", "virtusertable", "domaintable")


def available() -> str | None:
    """None when the unpacked tree can run here, else why not (for pytest.skip)."""
    for path in (SENDMAIL, MAKEMAP, M4, CF_DIR):
        if not path.exists():
            return f"{path} is missing: run .ci/sendmail-tree (as .ci/run does)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is missing"
    return None


def env() -> dict[str, str]:
    return {**os.environ, "LD_LIBRARY_PATH": str(TREE / "usr/lib/x86_64-linux-gnu")}


def _namespace() -> list[str]:
    # As root a UTS namespace is enough; otherwise a user namespace makes us root in it.
    return ["unshare", "--uts"] if os.geteuid() == 0 else ["unshare", "-r", "--uts"]


def _private_dev(folder: Path, syslog: Path) -> str:
    """Shell commands that put a /dev of a few devices and ``log`` → ``syslog`` over the
    real one, in the mount namespace they run in (unshare's mounts are private: the host's
    /dev is untouched)."""
    devices = ("null", "zero", "full", "random", "urandom", "tty")
    binds = "".join(
        f"touch {folder}/{d} && mount --bind /dev/{d} {folder}/{d} && " for d in devices
    )
    return (
        f"mkdir -p {folder} && mount -t tmpfs tmpfs {folder} && {binds}"
        f"ln -s {syslog} {folder}/log && mount --rbind {folder} /dev && "
    )


@dataclass(frozen=True)
class Verdict:
    """What check_rcpt returned: accepted, or the reply code and enhanced status."""

    accepted: bool
    code: int | None = None
    dsn: str | None = None
    text: str = ""


_ERROR = re.compile(r'\$# error (?:\$@ ([\d. ]+) )?\$: "?(\d{3}) ([^"]*)"?')


# -bt reads a typed "$|" as text, not as the operator the rulesets split on; this ruleset
# builds greet_pause's input ({client_name} $| {client_addr}) from macros set with .D.
_PROBES = """
LOCAL_RULESETS
SProbeGreetPause
R$*\t\t$: $&{client_name} $| $&{client_addr}
R$*\t\t$: $>greet_pause $1
"""


class SendmailBuild:
    def __init__(self, work: Path, mc: str, tables: Path) -> None:
        self.dir = work
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        (self.dir / "mqueue").mkdir(exist_ok=True)
        for name in (*MAP_TABLES, "local-host-names", "relay-domains", "aliases"):
            source = tables / name
            target = self.dir / name
            target.write_text(source.read_text() if source.exists() else "")
        (self.dir / "service.switch").write_text("hosts files\naliases files\n")
        helpfile = TREE / "etc/mail/helpfile"  # HELP's answers (HELP_FILE: the folder's)
        if helpfile.exists():
            shutil.copyfile(helpfile, self.dir / "helpfile")
        (self.dir / "hosts").write_text(f"127.0.0.1 localhost\n192.0.2.25 {HOSTNAME}\n")
        self.cf_dir = self._cf_tree(mc)
        self.mc = self.dir / "test.mc"
        self.mc.write_text(self._prelude() + self._relocated(mc) + _PROBES)
        self.cf = self.dir / "sendmail.cf"
        built = subprocess.run(
            [str(M4), f"-D_CF_DIR_={self.cf_dir}/", f"{self.cf_dir}/m4/cf.m4", str(self.mc)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if built.returncode != 0:
            raise RuntimeError(f"m4 failed: {built.stderr}")
        self.cf.write_text(built.stdout)
        for name in MAP_TABLES:
            self.makemap("hash", name, (self.dir / name).read_text(), check=True)

    def _cf_tree(self, mc: str) -> Path:
        """The package's cf/ tree, with an empty ostype file for an OSTYPE it lacks (the
        example's ``aixsample`` comes from AIX's own sendmail samples)."""
        tree = self.dir / "cf"
        tree.mkdir(exist_ok=True)
        for entry in CF_DIR.iterdir():
            if entry.name != "ostype" and not (tree / entry.name).exists():
                (tree / entry.name).symlink_to(entry)
        ostype = tree / "ostype"
        ostype.mkdir(exist_ok=True)
        for entry in (CF_DIR / "ostype").iterdir():
            if not (ostype / entry.name).exists():
                (ostype / entry.name).symlink_to(entry)
        for name in re.findall(r"OSTYPE\(`?([\w.-]+)'?\)", mc):
            if not (ostype / f"{name}.m4").exists():
                (ostype / f"{name}.m4").write_text("")
        return tree

    def _prelude(self) -> str:
        d = self.dir
        defines = {
            "MAIL_SETTINGS_DIR": f"{d}/",
            "QUEUE_DIR": f"{d}/mqueue",
            "ALIAS_FILE": f"{d}/aliases",
            "STATUS_FILE": f"{d}/statistics",
            "confPID_FILE": f"{d}/pid",
            "confSERVICE_SWITCH_FILE": f"{d}/service.switch",
            "confHOSTS_FILE": f"{d}/hosts",
            "confDONT_PROBE_INTERFACES": "True",
            "confDONT_BLAME_SENDMAIL": "TrustStickyBit",
            "confDOMAIN_NAME": HOSTNAME,
        }
        return "".join(f"define(`{k}', `{v}')dnl\n" for k, v in defines.items())

    def _relocated(self, mc: str) -> str:
        # Only where files are: /etc/mail/ → here; the dbm class this build lacks → hash
        # (mailgate reads the text, whatever map Sendmail made of it).
        text = mc.replace("/etc/mail/", f"{self.dir}/")
        return re.sub(r"`dbm ", "`hash ", text)

    # -- the programs ---------------------------------------------------------------------

    def makemap(
        self, kind: str, name: str, text: str, *options: str, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(MAKEMAP), "-C", str(self.cf), *options, kind, str(self.dir / name)],
            input=text,
            capture_output=True,
            text=True,
            env=env(),
            timeout=60,
            check=check,
        )

    def run(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        inner = " ".join(f"'{a}'" for a in (str(SENDMAIL), "-C", str(self.cf), *args))
        return subprocess.run(
            [*_namespace(), "sh", "-c", f"hostname {HOSTNAME} && exec {inner}"],
            input=stdin,
            capture_output=True,
            text=True,
            env=env(),
            timeout=60,
            check=False,
        )

    @contextlib.contextmanager
    def daemon(
        self, port: int, timeout: float = 30.0, *, syslog: Path | None = None
    ) -> Iterator[None]:
        """``sendmail -bD`` (the daemon in the foreground) while the block runs; the mc must
        have ``DAEMON_OPTIONS(`Port=<port>,Addr=127.0.0.1, Name=MTA')``. ``syslog``: a
        syslog daemon's socket (`tests.support.syslogd.Rsyslog`) that its maillog lines go
        to, as /dev/log in a private mount namespace (Sendmail has no option to log
        elsewhere: glibc's ``syslog()`` always writes to /dev/log)."""
        inner = " ".join(f"'{a}'" for a in (str(SENDMAIL), "-C", str(self.cf), "-bD"))
        namespace, setup = _namespace(), ""
        if syslog is not None:
            namespace = [*namespace, "--mount"]
            setup = _private_dev(self.dir / "dev", syslog)
        proc = subprocess.Popen(
            [*namespace, "sh", "-c", f"{setup}hostname {HOSTNAME} && exec {inner}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env(),
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                    break  # listening (this probe's session ends unanswered)
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"sendmail -bD did not listen on {port}: {err}")
                time.sleep(0.1)
            yield
        finally:
            proc.terminate()
            proc.wait(timeout)

    def bt(self, *lines: str) -> str:
        done = self.run("-bt", stdin="\n".join(lines) + "\n")
        return done.stdout

    def bt_each(self, queries: list[list[str]]) -> list[str]:
        """Several queries in one ``sendmail -bt``: the output of each, split at a marker that
        follows it (the value of macro $Z, printed by the input line ``$Z``)."""
        lines = []
        for n, query in enumerate(queries):
            lines += [*query, f".DZ@@{n}@@", "$Z"]
        parts = re.split(r"@@(\d+)@@\n", self.bt(*lines))
        out = parts[0:-1:2]
        assert [int(n) for n in parts[1::2]] == list(range(len(queries))), parts
        return out

    def parse(self, *addresses: str) -> list[str]:
        """``/parse address``: the line ``mailer M, host H, user U`` (or Sendmail's error)."""
        out = []
        for text in self.bt_each([[f"/parse {a}"] for a in addresses]):
            lines = text.splitlines()
            mailer = [ln.strip() for ln in lines if ln.startswith("mailer ")]
            errors = [ln.strip() for ln in lines if "... " in ln]
            out.append(mailer[-1] if mailer else errors[-1] if errors else text.strip())
        return out

    def check_rcpt(self, *cases: tuple[str, str, str | None, str]) -> list[Verdict]:
        """The check_rcpt ruleset for each (client IP, PTR status, PTR name, recipient)."""
        queries = [
            [
                f".D{{client_addr}}{ip}",
                f".D{{client_name}}{name or f'[{ip}]'}",
                f".D{{client_resolve}}{resolve}",
                f"check_rcpt <{address}>",
            ]
            for ip, resolve, name, address in cases
        ]
        verdicts = []
        for text in self.bt_each(queries):
            result = [
                ln for ln in text.splitlines() if ln.startswith("check_rcpt") and "returns" in ln
            ]
            verdict = result[-1].split("returns:", 1)[1].strip() if result else ""
            m = _ERROR.search(verdict)
            if m is None:
                verdicts.append(Verdict(True, text=verdict))
                continue
            dsn = m.group(1).replace(" ", "") if m.group(1) else None
            verdicts.append(Verdict(False, int(m.group(2)), dsn, m.group(3)))
        return verdicts

    def greet_pause(self, *clients: str) -> list[int]:
        """Milliseconds the greet_pause ruleset gives each client IP (0: none)."""
        queries = [
            [f".D{{client_addr}}{ip}", ".D{client_name}", "ProbeGreetPause x"] for ip in clients
        ]
        out = []
        for text in self.bt_each(queries):
            result = [
                ln
                for ln in text.splitlines()
                if ln.startswith("ProbeGreetPause") and "returns" in ln
            ]
            m = re.search(r"\$# (\d+)", result[-1]) if result else None
            out.append(int(m.group(1)) if m else 0)
        return out

    def options(self) -> dict[str, list[str]]:
        """``O Name=value`` lines of the built sendmail.cf, by option name."""
        out: dict[str, list[str]] = {}
        for line in self.cf.read_text().splitlines():
            if line.startswith("O "):
                name, _, value = line[2:].partition("=")
                out.setdefault(name.strip(), []).append(value.strip())
        return out
