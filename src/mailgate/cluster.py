"""``mailgate mailq --node URL …`` and ``mailgate qshape --node URL …``: the queues of several
nodes, read through each node's ``/queue`` and ``/qshape`` (``queuehttp.py``, on its metrics
listener) with the cluster's shared token.

The nodes are asked one after the other and each answer is printed as it streams in (a
million-entry queue is never held here either). A node that cannot be reached, refuses the
token or stops mid-listing is named on stderr and the others are printed all the same; the
exit status is then 1 (0: every node answered in full; 2: no token).
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO
from urllib.parse import urlencode

from mailgate import queuehttp
from mailgate.config import Config, read_token_file
from mailgate.queue import listing

TIMEOUT = 30.0  # seconds per connect and per read from a node
ALL_ANSWERED, SOME_FAILED, NO_TOKEN = 0, 1, 2


class NodeError(Exception):
    """A node that did not answer in full; ``str()`` says why, for stderr."""


def node_url(text: str) -> str:
    """``10.0.0.5:9925`` or ``http://10.0.0.5:9925/`` → ``http://10.0.0.5:9925``."""
    url = text if "://" in text else f"http://{text}"
    return url.rstrip("/")


def token_for(token_file: str | None, config: Callable[[], Config]) -> str:
    """``--token-file``'s token, else the local config's ``[metrics] token_file``'s;
    ValueError says why there is none."""
    if token_file is not None:
        return read_token_file(Path(token_file).expanduser())
    token = config().metrics.token
    if token is None:
        raise ValueError(
            "--node needs the cluster's token: set [metrics] token_file or give --token-file"
        )
    return token


@contextmanager
def _get(url: str, path: str, token: str) -> Iterator[http.client.HTTPResponse]:
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
            yield answer
    except urllib.error.HTTPError as exc:
        why = exc.read(500).decode("utf-8", "replace").strip()
        raise NodeError(f"{exc.code} {exc.reason}: {why}") from None
    except urllib.error.URLError as exc:
        raise NodeError(f"cannot reach it: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise NodeError(f"the answer broke off: {exc or type(exc).__name__}") from None


def _failed(err: TextIO, url: str, why: object) -> None:
    print(f"mailgate: node {url}: {why}", file=err)


# -- mailq --------------------------------------------------------------------------------------


def mailq(
    nodes: Sequence[str],
    token: str,
    out: TextIO,
    err: TextIO,
    *,
    as_json: bool,
    verbose: bool = False,
    selection: listing.Selection = listing.ALL,
) -> int:
    """Each node's queue: a line naming the node, then ``mailq``'s layout (``verbose``: ``-v``'s)
    for the entries ``selection`` takes of its queue (or all its JSON lines, each with a
    ``node`` field), then the total over the nodes. The header's count is the node's whole
    queue (its ``/queue`` says no more)."""
    total = answered = 0
    for url in map(node_url, nodes):
        listed = 0
        try:
            with _get(url, "/queue", token) as answer:
                if not as_json:
                    host = answer.headers.get(queuehttp.HOSTNAME, "?")
                    count = int(answer.headers.get(queuehttp.QUEUE_COUNT, "0"))
                    out.write(f"{host} ({url}):\n")
                    queue_dir = answer.headers.get(queuehttp.QUEUE_DIR, "queue")
                    out.write(
                        "".join(
                            f"{line}\n"
                            for line in listing.mailq_header(queue_dir, count, verbose=verbose)
                        )
                    )
                for raw in answer:
                    fields = json.loads(raw)
                    if as_json:
                        out.write(json.dumps({**fields, "node": url}, separators=(",", ":")) + "\n")
                    elif selection.takes(fields):
                        lines = listing.mailq_lines(fields, verbose=verbose)
                        out.write("".join(f"{line}\n" for line in lines))
                    else:
                        continue
                    listed += 1
        except NodeError as exc:
            _failed(err, url, exc)
            continue
        except (ValueError, KeyError, TypeError) as exc:
            _failed(err, url, f"not a mailgate queue listing after {listed} entries: {exc}")
            continue
        finally:
            total += listed
        answered += 1
        if not as_json:
            out.write(listing.mailq_total(listed) + "\n")
    if not as_json:
        missing = len(nodes) - answered
        of = f"{answered} of {len(nodes)} nodes; {missing} did not answer" if missing else None
        out.write(f"\t\tTotal requests on {of or f'{len(nodes)} nodes'}: {total}\n")
    return ALL_ANSWERED if answered == len(nodes) else SOME_FAILED


# -- qshape -------------------------------------------------------------------------------------


def qshape(
    nodes: Sequence[str],
    token: str,
    out: TextIO,
    err: TextIO,
    *,
    by_sender: bool,
    held: bool,
    buckets: int,
    minutes: float,
    top: int | None,
    per_node: bool,
) -> int:
    """The nodes' shapes summed into one table (``per_node``: each node's first, under a
    line naming it)."""
    query = urlencode(
        {
            "by": "sender" if by_sender else "recipient",
            "hold": int(held),
            "buckets": buckets,
            "minutes": minutes,
        }
    )
    whole = listing.Shape(buckets=buckets, minutes=minutes)
    answered = 0
    for url in map(node_url, nodes):
        try:
            with _get(url, f"/qshape?{query}", token) as answer:
                got = json.loads(answer.read())
            shape = listing.Shape(buckets=buckets, minutes=minutes)
            shape.add_rows(got["rows"])
        except NodeError as exc:
            _failed(err, url, exc)
            continue
        except (ValueError, KeyError, TypeError) as exc:
            _failed(err, url, f"not a mailgate qshape answer: {exc}")
            continue
        answered += 1
        whole.add_rows(shape.rows)
        if per_node:
            out.write(f"{got.get('hostname', '?')} ({url}):\n")
            out.write("".join(f"{line}\n" for line in shape.lines(top=top)) + "\n")
    if per_node:
        out.write(f"all nodes ({answered} of {len(nodes)} answered):\n")
    out.write("".join(f"{line}\n" for line in whole.lines(top=top)))
    return ALL_ANSWERED if answered == len(nodes) else SOME_FAILED


# -- the commands -------------------------------------------------------------------------------


def _token(args: argparse.Namespace, load: Callable[[str | None], Config]) -> str | None:
    try:
        return token_for(args.token_file, lambda: load(args.config))
    except ValueError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return None


def cmd_mailq(
    args: argparse.Namespace,
    load: Callable[[str | None], Config],
    out: TextIO,
    selection: listing.Selection,
) -> int:
    token = _token(args, load)
    if token is None:
        return NO_TOKEN
    return mailq(
        args.nodes,
        token,
        out,
        sys.stderr,
        as_json=args.json,
        verbose=args.verbose,
        selection=selection,
    )


def cmd_qshape(
    args: argparse.Namespace, load: Callable[[str | None], Config], out: TextIO, top: int | None
) -> int:
    token = _token(args, load)
    if token is None:
        return NO_TOKEN
    return qshape(
        args.nodes,
        token,
        out,
        sys.stderr,
        by_sender=args.sender or args.by == "sender",
        held=args.hold,
        buckets=args.buckets,
        minutes=args.minutes,
        top=top,
        per_node=args.per_node,
    )
