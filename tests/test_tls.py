"""STARTTLS (RFC 3207), served and used: certificates from a test CA (trustme), the real daemon,
smtplib and a raw client as peers, a sink next hop that offers STARTTLS itself."""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
import ssl
from pathlib import Path

import pytest
import trustme

from mailgate.config import ConfigError, load_config
from tests.support.dnsserver import DnsServer
from tests.support.gateway import GatewayProcess
from tests.support.rawsmtp import RawSmtp
from tests.support.sink import SinkServer
from tests.support.world import HOP1 as HOP
from tests.support.world import SENDER_DNS, SinkFactory, World

DNS_RECORDS = SENDER_DNS


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(ca: trustme.CA, directory: Path, *names: str) -> tuple[Path, Path]:
    cert = ca.issue_cert(*names)
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(key_file)
    return cert_file, key_file


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
def hop(make_sink: SinkFactory) -> SinkServer:
    return make_sink(HOP)


def tls_gateway(
    tmp_path: Path, ca: trustme.CA, dns: DnsServer, hop: SinkServer, extra: str = ""
) -> GatewayProcess:
    cert_file, key_file = write_pair(ca, tmp_path, "gateway.example.com", "127.0.0.1")
    world = World(
        tables={
            "mailertable": f"example.net smtp:[{HOP}]:{hop.port}\n",
            "access": "To:example.net RELAY\n",
        },
        settings=(
            f'[smtp]\ngreet_pause = "0s"\n[tls]\ncert_file = "{cert_file}"\n'
            f'key_file = "{key_file}"\n' + extra
        ),
    )
    return world.gateway(tmp_path / "gw", dns)


def test_starttls_then_relay(
    tmp_path: Path, ca: trustme.CA, dns: DnsServer, hop: SinkServer
) -> None:
    with tls_gateway(tmp_path, ca, dns, hop) as gw:
        with smtplib.SMTP(gw.host, gw.port, timeout=10) as s:
            code, text = s.ehlo("client.example.net")
            assert code == 250 and b"\nSTARTTLS\n" in text
            assert s.starttls(context=client_context(ca))[0] == 220
            assert s.sock.version() == "TLSv1.3"  # both ends' default, the highest
            code, text = s.ehlo("client.example.net")
            assert code == 250 and b"STARTTLS" not in text  # not offered twice
            assert s.docmd("STARTTLS") == (503, b"5.5.1 TLS already active")
            s.sendmail("a@example.org", ["bob@example.net"], b"Subject: sealed\r\n\r\nhi\r\n")
        [msg] = hop.wait_for(1, timeout=10)
        received = msg.data.split(b"\r\n\tfor ")[0].decode()
        assert "\r\n\t(version=TLSv1.3" in received and " verify=NOT)" in received
        assert " bits=" in received and " cipher=" in received
        assert " with ESMTPS id " in received
        log = gw.wait_log("proto=ESMTPS")
        assert "STARTTLS=server, relay=localhost [127.0.0.1], version=TLSv1.3" in log
        assert ", verify=NOT, cipher=" in log


def test_plaintext_pipelined_after_starttls_is_dropped(
    tmp_path: Path, ca: trustme.CA, dns: DnsServer, hop: SinkServer
) -> None:
    """CVE-2011-0411: commands sent in clear behind STARTTLS must not run inside TLS."""
    with tls_gateway(tmp_path, ca, dns, hop) as gw, RawSmtp(gw.host, gw.port) as c:
        assert c.read_reply().code == 220
        assert c.cmd("EHLO client.example.net").code == 250
        c.send(b"STARTTLS\r\nMAIL FROM:<injected@example.org>\r\n")
        assert c.read_reply().first == "220 2.0.0 Ready to start TLS"
        assert not c.buf
        tls_sock = client_context(ca).wrap_socket(c.sock, server_hostname="gateway.example.com")
        f = tls_sock.makefile("rwb")
        f.write(b"NOOP\r\n")
        f.flush()
        assert f.readline() == b"250 2.0.0 OK\r\n"  # not the injected MAIL's reply
        f.write(b"MAIL FROM:<a@example.org>\r\n")
        f.flush()
        assert f.readline().startswith(b"250 2.1.0")  # no transaction was open
        f.close()
        tls_sock.close()
    assert "plaintext pipelined after STARTTLS discarded" in gw.log()


def test_failed_handshake_closes_only_that_session(
    tmp_path: Path, ca: trustme.CA, dns: DnsServer, hop: SinkServer
) -> None:
    with tls_gateway(tmp_path, ca, dns, hop) as gw:
        with RawSmtp(gw.host, gw.port) as c:
            assert c.read_reply().code == 220
            assert c.cmd("STARTTLS").code == 220
            c.send(b"this is not a TLS ClientHello\r\n" * 4)
            c.wait_closed()
        assert "STARTTLS=server, error: accept failed" in gw.wait_log("accept failed")
        with smtplib.SMTP(gw.host, gw.port, timeout=10) as s:
            assert s.noop()[0] == 250


def test_starttls_refused_in_a_transaction_or_with_arguments(
    tmp_path: Path, ca: trustme.CA, dns: DnsServer, hop: SinkServer
) -> None:
    with tls_gateway(tmp_path, ca, dns, hop) as gw, RawSmtp(gw.host, gw.port) as c:
        assert c.read_reply().code == 220
        assert c.cmd("EHLO client.example.net").code == 250
        assert c.cmd("STARTTLS now").first.startswith("501 5.5.4")
        assert c.cmd("MAIL FROM:<a@example.org>").code == 250
        assert c.cmd("STARTTLS").first.startswith("503 5.5.1")


def test_no_certificate_no_starttls(tmp_path: Path, dns: DnsServer) -> None:
    world = World(settings='[smtp]\ngreet_pause = "0s"\n')
    with world.gateway(tmp_path / "gw", dns) as gw, RawSmtp(gw.host, gw.port) as c:
        assert c.read_reply().code == 220
        assert "STARTTLS" not in c.cmd("EHLO client.example.net").lines
        assert c.cmd("STARTTLS").first.startswith("502 5.5.1")


def test_bad_tls_settings_name_file_and_line(tmp_path: Path, ca: trustme.CA) -> None:
    cert_file, key_file = write_pair(ca, tmp_path, "gateway.example.com")
    conf = tmp_path / "mailgate.toml"
    conf.write_text(f'hostname = "gw.example.com"\n[tls]\ncert_file = "{cert_file}"\n')
    with pytest.raises(ConfigError) as err:
        load_config(conf)
    assert f"{conf}:" in str(err.value) and "key_file" in str(err.value)
    other_key = tmp_path / "other.pem"
    trustme.CA().issue_cert("x.example").private_key_pem.write_to_path(other_key)
    conf.write_text(
        f'hostname = "gw.example.com"\n[tls]\ncert_file = "{cert_file}"\nkey_file = "{other_key}"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(conf)
    assert f"{conf}:3:" in str(err.value) and "not a PEM certificate and its key" in str(err.value)
    conf.write_text(
        f'hostname = "gw.example.com"\n[tls]\ncert_file = "{tmp_path}/none.pem"\n'
        f'key_file = "{key_file}"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(conf)
    assert "cannot read" in str(err.value)
    conf.write_text('hostname = "gw.example.com"\n[tls]\ndelivery = "always"\n')
    with pytest.raises(ConfigError) as err:
        load_config(conf)
    assert f"{conf}:3:" in str(err.value)


def sink_context(ca: trustme.CA, tmp_path: Path) -> ssl.SSLContext:
    cert_file, key_file = write_pair(ca, tmp_path, "sink.test")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def test_delivery_uses_starttls_when_the_hop_offers_it(
    tmp_path: Path, ca: trustme.CA, dns: DnsServer, hop: SinkServer
) -> None:
    hop.tls_context = sink_context(ca, tmp_path)
    with tls_gateway(tmp_path, ca, dns, hop) as gw:
        with smtplib.SMTP(gw.host, gw.port, timeout=10) as s:
            s.sendmail("a@example.org", ["bob@example.net"], b"Subject: out\r\n\r\nhi\r\n")
        [msg] = hop.wait_for(1, timeout=10)
        assert msg.tls == "TLSv1.3"
        assert msg.helo == "gateway.example.com"  # EHLO again after the handshake
        log = gw.wait_log("stat=Sent")
        assert f"STARTTLS=client, relay=[{HOP}], version=TLSv1.3" in log
        assert ", verify=NO, cipher=" in log


def test_delivery_in_clear_when_tls_fails_or_is_off(
    tmp_path: Path, ca: trustme.CA, dns: DnsServer, hop: SinkServer
) -> None:
    """Opportunistic: a hop whose TLS handshake fails still gets the mail, in clear, at once;
    with [tls] delivery = "none" STARTTLS is never tried."""
    hop.tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # no certificate
    with tls_gateway(tmp_path / "a", ca, dns, hop) as gw:
        with smtplib.SMTP(gw.host, gw.port, timeout=10) as s:
            s.sendmail("a@example.org", ["bob@example.net"], b"Subject: clear\r\n\r\nhi\r\n")
        [msg] = hop.wait_for(1, timeout=10)
        assert msg.tls is None
        log = gw.wait_log("stat=Sent")
        assert "STARTTLS=client, error: TLS handshake with [127.0.0.5] failed" in log
        assert "going on in clear" in log
    hop.tls_context = sink_context(ca, tmp_path)
    with tls_gateway(tmp_path / "b", ca, dns, hop, extra='delivery = "none"\n') as gw:
        with smtplib.SMTP(gw.host, gw.port, timeout=10) as s:
            s.sendmail("a@example.org", ["bob@example.net"], b"Subject: off\r\n\r\nhi\r\n")
        msgs = hop.wait_for(2, timeout=10)
        assert msgs[1].tls is None
        assert not any(c == "STARTTLS" for c in hop.commands[-8:])


class TlsClient:
    """A client that speaks TLS through memory BIOs over a plain socket, so that it can
    half-close either way: TCP FIN without close_notify, or close_notify then keep reading."""

    def __init__(self, ca: trustme.CA, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.plain = b""

    def plain_reply(self) -> bytes:
        while b"\r\n" not in self.plain or not re.search(rb"(^|\n)\d{3} [^\n]*\r\n$", self.plain):
            data = self.sock.recv(4096)
            assert data, self.plain
            self.plain += data
        reply, self.plain = self.plain, b""
        return reply

    def start_tls(self, ca: trustme.CA) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_context(ca).wrap_bio(
            self.incoming, self.outgoing, server_hostname="gateway.example.com"
        )
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._pump()
        self._flush()

    def _flush(self) -> None:
        out = self.outgoing.read()
        if out:
            self.sock.sendall(out)

    def _pump(self) -> None:
        self._flush()
        data = self.sock.recv(65536)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def read_until(self, marker: bytes) -> bytes:
        """What the server says over TLS until ``marker`` has arrived."""
        got = b""
        while marker not in got:
            try:
                got += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._pump()
        return got

    def read_all(self) -> bytes:
        """Everything the server says until it closes (close_notify or FIN)."""
        got = b""
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._pump()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return got
            if not chunk:
                return got
            got += chunk


@pytest.mark.parametrize("how", ["tcp-fin", "close-notify"])
def test_half_close_after_the_dot_over_tls_still_gets_250_and_221(
    tmp_path: Path, ca: trustme.CA, dns: DnsServer, hop: SinkServer, how: str
) -> None:
    """A client that sends its message and QUIT, then closes its sending side, must still
    read the replies; else it never learns the message was taken and sends it again."""
    with tls_gateway(tmp_path, ca, dns, hop) as gw:
        c = TlsClient(ca, gw.host, gw.port)
        assert c.plain_reply().startswith(b"220 ")
        c.sock.sendall(b"EHLO client.example.org\r\n")
        assert b"STARTTLS" in c.plain_reply()
        c.sock.sendall(b"STARTTLS\r\n")
        assert c.plain_reply().startswith(b"220 2.0.0")
        c.start_tls(ca)
        c.send(
            b"EHLO client.example.org\r\nMAIL FROM:<a@example.org>\r\n"
            b"RCPT TO:<bob@example.net>\r\nDATA\r\n"
        )
        head = c.read_until(b"\r\n354 ")  # no content before the 354
        c.send(b"Subject: half-closed\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        if how == "tcp-fin":
            c.sock.shutdown(socket.SHUT_WR)
        else:
            with contextlib.suppress(ssl.SSLWantReadError):
                c.tls.unwrap()
            c._flush()
        transcript = (head + c.read_all()).decode()
        c.sock.close()
        assert "\r\n250 2.0.0 " in transcript and "Message accepted for delivery" in transcript
        assert transcript.endswith(" closing connection\r\n") and "\r\n221 2.0.0 " in transcript
        [msg] = hop.wait_for(1, timeout=10)
        assert b"Subject: half-closed" in msg.data
    stderr = (gw.dir / "stderr.log").read_text()  # complete: the daemon has stopped
    assert "eof_received" not in stderr and "Traceback" not in stderr, stderr
