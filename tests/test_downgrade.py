"""8BITMIME downgrade (mailgate.smtp.downgrade): which parts change and how, that
quoted-printable decoding gives every converted part back byte for byte, and that the split
into blocks never changes the output."""

from __future__ import annotations

import io
import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate import dsn
from mailgate.smtp.downgrade import (
    MAX_HEADER,
    Downgrader,
    Plan,
    Scanner,
    plan_for,
)
from tests.support.mime import head_body, qp_decode


def convert(msg: bytes, cuts: tuple[list[int], list[int]] = ([], [])) -> tuple[Plan, bytes]:
    """Both passes, each fed in the blocks ``cuts`` make."""
    scanner = Scanner()
    for piece in split(msg, cuts[0]):
        scanner.feed(piece)
    plan = scanner.end()
    down = Downgrader(plan)
    out = b"".join(down.feed(p) for p in split(msg, cuts[1])) + down.end()
    return plan, out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def random_cuts(data: bytes, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)

    def some() -> list[int]:
        return [rng.randrange(0, len(data) + 1) for _ in range(rng.randrange(0, 20))]

    return some(), some()


# == examples ====================================================================================


def test_non_mime_8bit_message() -> None:
    msg = (
        "Subject: s\r\nFrom: a@example.org\r\n\r\nCafé crème = très bien \r\n-- \r\nsig\r\n"
    ).encode()
    _, out = convert(msg)
    head, body = head_body(out)
    assert head == (
        b"Subject: s\r\nFrom: a@example.org\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
    )
    assert body == b"Caf=C3=A9 cr=C3=A8me =3D tr=C3=A8s bien=20\r\n--=20\r\nsig\r\n"
    assert qp_decode(body) == head_body(msg)[1]


def test_charset_when_not_utf8() -> None:
    msg = b"Subject: s\r\n\r\nCaf\xe9\r\n"
    _, out = convert(msg)
    assert b"Content-Type: text/plain; charset=unknown-8bit\r\n" in out
    # UTF-8 split across blocks is still UTF-8.
    msg = "Subject: s\r\n\r\nCafé\r\n".encode()
    for cut in range(len(msg)):
        assert b"charset=utf-8" in convert(msg, ([cut], [cut]))[1]


def test_existing_content_type_kept() -> None:
    msg = b"Content-Type: text/plain; charset=iso-8859-1\r\nSubject: s\r\n\r\nCaf\xe9\r\n"
    _, out = convert(msg)
    assert out == (
        b"Content-Type: text/plain; charset=iso-8859-1\r\nSubject: s\r\n"
        b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"Caf=E9\r\n"
    )


def test_seven_bit_content_is_not_touched() -> None:
    msg = (
        b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\nplain ASCII = fine\r\n"
    )
    plan, out = convert(msg)
    assert not plan.converts and out == msg
    # 8-bit octets only in the header section: nothing a body encoding can fix (Postfix
    # sends them as they are, so do we).
    msg = "Subject: café\r\n\r\nascii\r\n".encode()
    plan, out = convert(msg)
    assert not plan.converts and out == msg


MULTI = (
    b"MIME-Version: 1.0\r\nSubject: m\r\n"
    b'Content-Type: multipart/mixed;\r\n\tboundary="outer"\r\n'
    b"Content-Transfer-Encoding: 8bit\r\n\r\n"
    b"preamble\r\n"
    b"--outer\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    b"\r\nh\xc3\xa9llo\r\n"
    b"--outer\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\nascii only\r\n"
    b"--outer\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
    b"\r\nAAECAw==\r\n"
    b"--outer\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n"
    b"\r\nalready =C3=A9 and a stray \xff\r\n"
    b"--outer\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"Subject: inner\r\nContent-Type: multipart/alternative; boundary=inner\r\n\r\n"
    b"--inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>\xc3\xa9</p>\r\n"
    b"--inner--\r\n"
    b"--outer--\r\nepilogue\r\n"
)


def test_multipart_and_nested_message() -> None:
    _, out = convert(MULTI)
    assert out == (
        b"MIME-Version: 1.0\r\nSubject: m\r\n"
        b'Content-Type: multipart/mixed;\r\n\tboundary="outer"\r\n'
        b"Content-Transfer-Encoding: 7bit\r\n\r\n"
        b"preamble\r\n"
        b"--outer\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nh=C3=A9llo\r\n"
        # Labelled 8bit but 7-bit: left as it is (the label is still true).
        b"--outer\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"ascii only\r\n"
        b"--outer\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nAAECAw==\r\n"
        # Already encoded: never encoded twice, whatever it holds.
        b"--outer\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        b"\r\nalready =C3=A9 and a stray \xff\r\n"
        b"--outer\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
        b"Subject: inner\r\nContent-Type: multipart/alternative; boundary=inner\r\n"
        b"MIME-Version: 1.0\r\n\r\n"
        b"--inner\r\nContent-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n<p>=C3=A9</p>\r\n"
        b"--inner--\r\n"
        b"--outer--\r\nepilogue\r\n"
    )
    for seed in range(200):
        assert convert(MULTI, random_cuts(MULTI, seed))[1] == out


def test_every_old_encoding_field_goes() -> None:
    msg = (
        b"MIME-Version: 1.0\r\ncOnTeNt-TrAnSfEr-EnCoDiNg: 8bit\r\nX-A: 1\r\n"
        b"Content-Transfer-Encoding:\r\n 8bit\r\nX-B: 2\r\n\r\n\xe9\r\n"
    )
    _, out = convert(msg)
    assert out == (
        b"MIME-Version: 1.0\r\nX-A: 1\r\nX-B: 2\r\n"
        b"Content-Type: text/plain; charset=unknown-8bit\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=E9\r\n"
    )


def test_digest_parts_default_to_message() -> None:
    msg = (
        b"MIME-Version: 1.0\r\nContent-Type: multipart/digest; boundary=d\r\n\r\n"
        b"--d\r\n\r\nSubject: one\r\n\r\nv\xc3\xa9\r\n--d--\r\n"
    )
    _, out = convert(msg)
    assert out == (
        b"MIME-Version: 1.0\r\nContent-Type: multipart/digest; boundary=d\r\n\r\n"
        b"--d\r\n\r\nSubject: one\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nv=C3=A9\r\n--d--\r\n"
    )


def test_parts_that_may_not_be_encoded() -> None:
    for ctype in (
        b"message/partial; id=x; number=1",
        b"message/external-body; access-type=x",
        b"message/delivery-status",
        b"multipart/mixed",
    ):  # (no boundary)
        msg = b"MIME-Version: 1.0\r\nContent-Type: " + ctype + b"\r\n\r\n\xc3\xa9\r\n"
        plan, out = convert(msg)
        assert not plan.converts and out == msg, ctype
    msg = b"MIME-Version: 1.0\r\nContent-Type: message/global\r\n\r\nSubject: \xc3\xa9\r\n"
    _, out = convert(msg)
    assert b"Content-Transfer-Encoding: quoted-printable\r\n\r\nSubject: =C3=A9\r\n" in out


def test_outer_boundary_ends_inner_multipart() -> None:
    # The inner multipart never closes: the outer boundary ends it (RFC 2046, Postfix).
    msg = (
        b"Content-Type: multipart/mixed; boundary=o\r\n\r\n"
        b"--o\r\nContent-Type: multipart/mixed; boundary=i\r\n\r\n"
        b"--i\r\n\r\n\xe9\r\n"
        b"--o\r\n\r\n\xe9\r\n--o--\r\n"
    )
    _, out = convert(msg)
    assert out.count(b"Content-Transfer-Encoding: quoted-printable") == 2
    assert out.count(b"=E9\r\n") == 2 and out.isascii()
    assert out.startswith(b"Content-Type: multipart/mixed; boundary=o\r\nMIME-Version: 1.0\r\n")


def test_boundary_prefix_and_transport_padding() -> None:
    msg = (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b  \r\n\r\n\xe9\r\n--b-- trailing words\r\nepi\xe9\r\n"
    )
    _, out = convert(msg)
    assert out.endswith(b"\r\n\r\n=E9\r\n--b-- trailing words\r\nepi\xe9\r\n")


def test_no_soft_break_before_a_dash() -> None:
    # A soft break must not start a line with "--": it could read as a boundary.
    line = b"\xc3\xa9" + b"-" * 200
    msg = (
        b'Content-Type: multipart/mixed; boundary="--"\r\n\r\n'
        b"----\r\n\r\n" + line + b"\r\n------\r\n"
    )
    _, out = convert(msg)
    body = out.split(b"quoted-printable\r\n\r\n")[1].rsplit(b"\r\n------", 1)[0]
    assert all(not ln.startswith(b"-") for ln in body.split(b"\r\n")[1:])
    assert qp_decode(body) == line


def test_long_8bit_line_and_bare_cr_lf() -> None:
    body = (
        b"\xe9" * 10_000 + b" \r\n" + b"x\ry\nz\r\r\n" + b"t\t\r\n" + b"a" * 9000 + b"\xe9" + b"\r"
    )
    msg = b"Subject: s\r\n\r\n" + body
    _, out = convert(msg)
    converted = head_body(out)[1]
    assert qp_decode(converted) == body
    for seed in range(50):
        assert convert(msg, random_cuts(msg, seed))[1] == out


def test_huge_header_section_passes_through() -> None:
    big = b"X-Big: " + b"v" * 70 + b"\r\n"
    msg = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        + big * (MAX_HEADER // len(big) + 2)
        + b"\r\n\xe9\r\n"
        b"--b\r\n\r\n\xe9\r\n--b--\r\n"
    )
    _, out = convert(msg)
    # The first part is too big to parse: passed as it is; the second is converted.
    assert out.count(b"quoted-printable") == 1 and out.count(b"\r\n\xe9\r\n--b\r\n") == 1


def test_our_bounce_of_an_8bit_message(tmp_path: Path) -> None:
    original = ("From: a@example.org\r\nSubject: s\r\n\r\nGrüße\r\n").encode()
    spool = tmp_path / "orig"
    spool.write_bytes(b"envelope\n" + original)
    out = io.BytesIO()
    dsn.write_dsn(
        out,
        hostname="gw.example.com",
        queue_id="Q1",
        arrival=0.0,
        client="c",
        sender="a@example.org",
        original_path=spool,
        original_offset=9,
        recipients=[dsn.DsnRecipient("b@example.net", None, "5.1.1", None, None)],
    )
    bounce = out.getvalue()
    plan, converted = convert(bounce)
    assert plan.converts and converted.isascii()
    # The enclosed message got MIME headers of its own, its body quoted-printable.
    assert (
        b"Content-Type: message/rfc822\r\n\r\nFrom: a@example.org\r\nSubject: s\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe\r\n"
    ) in converted


# == properties ==================================================================================

LINE_PIECES = [
    b"word",
    b" ",
    b"\t",
    b"=",
    b"-",
    b"--",
    b".",
    b"\xc3\xa9",
    b"\xe9",
    b"\xff",
    b"\x00",
    b"\r",
    b"\n",
    b"x" * 90,
]


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    lines = draw(
        st.lists(st.lists(st.sampled_from(LINE_PIECES), max_size=12).map(b"".join), max_size=8)
    )
    body = b"\r\n".join(lines)
    return body + (b"\r\n" if draw(st.booleans()) else b"")


@dataclass
class Node:
    kind: str  # leaf | multipart | rfc822
    headers: list[bytes]
    body: bytes = b""
    cte: str = ""
    has_ctype: bool = False
    boundary: bytes = b""
    parts: list[Node] = field(default_factory=list)
    preamble: bytes = b""
    epilogue: bytes = b""
    inner: Node | None = None


CTES = ["", "7bit", "8bit", "binary", "base64", "quoted-printable"]


@st.composite
def nodes(draw: st.DrawFn, depth: int = 0, counter: list[int] | None = None) -> Node:
    counter = counter if counter is not None else [0]
    kinds = ["leaf"] if depth >= 3 else ["leaf", "leaf", "multipart", "rfc822"]
    kind = draw(st.sampled_from(kinds))
    headers = [b"X-Test: " + str(depth).encode() + b"\r\n"] if draw(st.booleans()) else []
    if kind == "leaf":
        cte = draw(st.sampled_from(CTES))
        has_ctype = draw(st.booleans())
        if has_ctype:
            headers.append(b"Content-Type: text/plain; charset=x\r\n")
        if cte:
            headers.append(b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n")
        return Node("leaf", headers, body=draw(bodies()), cte=cte, has_ctype=has_ctype)
    cte = draw(st.sampled_from(["", "7bit", "8bit", "binary"]))
    if kind == "rfc822":
        headers.append(b"Content-Type: message/rfc822\r\n")
        if cte:
            headers.append(b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n")
        return Node("rfc822", headers, cte=cte, inner=draw(nodes(depth + 1, counter)))
    counter[0] += 1
    # "_" never occurs in a body: no body line can look like a boundary.
    boundary = b"=_b" + str(counter[0]).encode() + b"_" + str(depth).encode()
    headers.append(b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n')
    if cte:
        headers.append(b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n")
    parts = draw(st.lists(nodes(depth + 1, counter), min_size=1, max_size=3))
    preamble = draw(st.sampled_from([b"", b"preamble\r\n", b"pr\xe9amble\r\n"]))
    epilogue = draw(st.sampled_from([b"", b"epilogue\r\n", b"\xe9pilogue"]))
    return Node(
        "multipart",
        headers,
        cte=cte,
        boundary=boundary,
        parts=parts,
        preamble=preamble,
        epilogue=epilogue,
    )


def render(node: Node) -> bytes:
    head = b"".join(node.headers) + b"\r\n"
    if node.kind == "leaf":
        return head + node.body
    if node.kind == "rfc822":
        assert node.inner is not None
        return head + render(node.inner)
    b = node.boundary
    body = node.preamble + b"--" + b + b"\r\n"
    body += (b"\r\n--" + b + b"\r\n").join(render(p) for p in node.parts)
    return head + body + b"\r\n--" + b + b"--\r\n" + node.epilogue


def has_8bit_leaf(node: Node) -> bool:
    """Something the downgrade converts: a leaf with an identity encoding and 8-bit body."""
    if node.kind == "leaf":
        return node.cte in ("", "7bit", "8bit", "binary") and not node.body.isascii()
    if node.kind == "rfc822":
        assert node.inner is not None
        return node.cte in ("", "7bit", "8bit", "binary") and has_8bit_leaf(node.inner)
    return any(has_8bit_leaf(p) for p in node.parts)


def check(node: Node, out: bytes, *, is_message: bool) -> None:
    """``out`` is what became of ``node``: compare part by part."""
    head, body = head_body(out)
    orig_head = b"".join(node.headers)
    changed = has_8bit_leaf(node)
    expect_head = orig_head
    if changed:
        added = b"MIME-Version: 1.0\r\n" if is_message else b""
        if node.kind == "leaf":
            if not node.has_ctype:
                charset = b"utf-8"
                try:
                    node.body.decode("utf-8")
                except UnicodeDecodeError:
                    charset = b"unknown-8bit"
                added += b"Content-Type: text/plain; charset=" + charset + b"\r\n"
            added += b"Content-Transfer-Encoding: quoted-printable\r\n"
        elif node.cte in ("8bit", "binary"):
            added += b"Content-Transfer-Encoding: 7bit\r\n"
        if b"Content-Transfer-Encoding: quoted-printable" in added or b"7bit\r\n" in added:
            expect_head = b"".join(
                h for h in node.headers if not h.startswith(b"Content-Transfer-Encoding")
            )
        expect_head += added
    assert head == expect_head
    if node.kind == "leaf":
        if changed:
            assert qp_decode(body) == node.body
        else:
            assert body == node.body
    elif node.kind == "rfc822":
        assert node.inner is not None
        check(node.inner, body, is_message=True)
    else:
        b = node.boundary
        start = node.preamble + b"--" + b + b"\r\n"
        end = b"\r\n--" + b + b"--\r\n" + node.epilogue
        assert body.startswith(start) and body.endswith(end)
        inside = body[len(start) : len(body) - len(end)]
        pieces = inside.split(b"\r\n--" + b + b"\r\n")
        assert len(pieces) == len(node.parts)
        for part, piece in zip(node.parts, pieces, strict=True):
            check(part, piece, is_message=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=nodes(), seed=st.integers(0, 2**32 - 1))
def test_fuzz_structures(tree: Node, seed: int) -> None:
    msg = render(tree)
    plan, out = convert(msg)
    assert plan.converts == has_8bit_leaf(tree)
    check(tree, out, is_message=True)
    assert convert(msg, random_cuts(msg, seed))[1] == out
    if not plan.converts:
        assert out == msg


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=2000),
    prefix=st.sampled_from(
        [
            b"",
            b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n",
            b"Content-Type: message/rfc822\r\n\r\n",
            b"Content-Type: multipart/digest; boundary=a\r\n\r\n",
        ]
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_fuzz_arbitrary_bytes(data: bytes, prefix: bytes, seed: int) -> None:
    msg = prefix + data
    _, out = convert(msg)
    assert convert(msg, random_cuts(msg, seed))[1] == out
    assert plan_for(msg) == convert(msg)[0]
