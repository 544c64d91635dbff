"""Asking the routing and the DNS: route, check-dns."""

from __future__ import annotations

import argparse
import asyncio
import sys

from mailgate.cli.common import snapshot_or_exit


def cmd_route(args: argparse.Namespace) -> int:
    """Like ``sendmail -bt`` with ``/parse``: where each address would go, sending nothing."""
    from mailgate.address import AddressError, normalize
    from mailgate.delivery.uucp import recipient_argument
    from mailgate.routing import resolve

    snapshot = snapshot_or_exit(args.config)
    status = 0
    for arg in args.addresses:
        raw = arg[1:-1] if arg.startswith("<") and arg.endswith(">") else arg
        try:
            mailbox = normalize(raw, snapshot.routing.is_local)
        except AddressError as exc:
            print(f"{arg}: {exc.reply}")
            status = 1
            continue
        routes = resolve(mailbox, snapshot.routing, expand=True)
        print(f"{arg}:" if len(routes) != 1 else f"{arg}: ", end="")
        for route in routes:
            prefix = "\n  " if len(routes) != 1 else ""
            if route.mailer == "error" and route.error is not None:
                print(f"{prefix}mailer error, {route.error.reply(f'<{mailbox}>')}  [{route.via}]")
                status = 1
                continue
            host = route.host or ("local" if route.mailer == "local" else "")
            # A UUCP mailer's user is its $u, as -bt shows the user after the mailer's R=.
            user = (
                recipient_argument(route.mailer, route.address) if route.is_uucp else route.address
            )
            print(f"{prefix}mailer {route.mailer}, host {host}, user {user}  [{route.via}]")
        if len(routes) != 1:
            print()
    return status


def cmd_check_dns(args: argparse.Namespace) -> int:
    """What the DNS says of this gateway: one line per check, 1 if any failed."""
    import ipaddress

    from mailgate import daemon, dnscheck

    snapshot = snapshot_or_exit(args.config)
    cfg = snapshot.config
    names = tuple(dict.fromkeys(n.lower().rstrip(".") for n in [cfg.hostname, *args.name]))
    try:
        given = [str(ipaddress.ip_address(a)) for a in args.address]
    except ValueError as exc:
        print(f"mailgate: --address: {exc}", file=sys.stderr)
        return 2
    # Where clients connect directly: the MX's addresses of a PROXY listener are the
    # balancer's, not the gateway's, so a gateway with only those compares none.
    listen = {ls.address[0] for ls in cfg.listeners if ls.proxy_protocol is None}
    if given:
        addresses: frozenset[str] | None = frozenset(given)
    elif not listen or listen & {"0.0.0.0", "::"}:
        addresses = None  # every address of the machine: nothing to compare with
    else:
        addresses = frozenset(listen)
    gateway = dnscheck.Gateway(
        names,
        addresses,
        args.port,
        args.timeout if args.timeout is not None else cfg.smtp.greet_pause + 10.0,
    )
    domains = [d.lower().rstrip(".") for d in args.domains] or dnscheck.served_domains(
        snapshot.tables
    )
    counts = {"OK": 0, "WARN": 0, "FAIL": 0}
    if not domains:
        print("WARN domains: none served (local-host-names, relay-domains, mailertable, access)")
        counts["WARN"] += 1

    async def run() -> None:
        async for finding in dnscheck.check(daemon.make_resolver(cfg), gateway, domains):
            counts[finding.status] += 1
            print(finding, flush=True)

    daemon.install_event_loop()
    asyncio.run(run())
    print(f"check-dns: {counts['OK']} OK, {counts['WARN']} WARN, {counts['FAIL']} FAIL")
    return 1 if counts["FAIL"] else 0
