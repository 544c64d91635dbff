"""What each Sendmail name means for mailgate: the importer's knowledge, as data.

Features, defines and macros with nothing to set (``NOTE_*``: the text says what they are in
mailgate), with no equivalent (``WARN_*``: the warning says what changes), that make an open
relay (``OPEN_RELAY``: refused always) or turn a sender check off (``UNSAFE``: imported only
with ``--allow-unsafe``); Sendmail's defaults that decide behaviour and differ from mailgate's
(``SENDMAIL_DEFAULTS``: written when the mc is silent) and mailgate's protections Sendmail
lacked (``KEPT``: listed with Sendmail's value). `migrate.mc` reads them.
"""

from __future__ import annotations

import re

from mailgate.config import TomlValue

# FEATURE(name) with nothing to set in mailgate: what it means there.
NOTE_FEATURES = {
    "use_cw_file": "local-host-names (class w): mailgate reads it from the mail dir",
    "no_default_msa": "no submission (MSA) port 587: mailgate listens only where listen says",
    "nocanonify": "host names are not canonified through DNS: mailgate never does",
    "redirect": "user.REDIRECT aliases: checked against the aliases table below",
    "smrsh": "alias programs restricted to smrsh: checked against the aliases table below",
}

# FEATURE(name) mailgate has no equivalent for: the warning says what changes.
WARN_FEATURES = {
    "delay_checks": "Connect: and From: rejections are not delayed to RCPT, and Spam:"
    " FRIEND/HATER entries are ignored: mailgate refuses a client or sender where it is found",
    "conncontrol": "ClientConn: access entries are not used: [smtp] max_connections_per_ip"
    " is one limit for every client",
    "ratecontrol": "ClientRate: access entries are not used: [smtp] connection_rate_throttle"
    " is one limit for all clients",
    "dnsbl": "mailgate has no DNS block lists: mail the list refused is accepted",
    "enhdnsbl": "mailgate has no DNS block lists: mail the list refused is accepted",
    "rhsbl": "mailgate has no DNS block lists: mail the list refused is accepted",
    "require_rdns": "clients without reverse DNS are not refused by mailgate",
    "block_bad_helo": "bad HELO names are not refused by mailgate",
    "badmx": "sender domains with bad MX records are not refused by mailgate",
    "virtuser_entire_domain": "virtusertable applies to exact local domains only in mailgate,"
    " not to their subdomains",
    "relay_entire_domain": "relaying for the whole local domain ($=m) is not done: list the"
    " domains in relay-domains",
    "relay_based_on_MX": "relaying for every domain whose MX is this host is not done: list"
    " the domains in relay-domains or access (To:dom RELAY)",
    "local_procmail": "local mail is delivered to Maildirs under [local] maildir_root, not by"
    " procmail",
    "local_lmtp": "local mail is delivered to Maildirs under [local] maildir_root, not by LMTP",
    "msp": "this mc configures a submission client (MSP), not a gateway",
    "nullclient": "this mc configures a null client that sends everything to one host, not a"
    " gateway; a mailertable '.' entry does that in mailgate",
    "genericstable": "mailgate does not rewrite sender addresses (no genericstable)",
    "generics_entire_domain": "mailgate does not rewrite sender addresses (no genericstable)",
    "allmasquerade": "mailgate does not masquerade addresses",
    "limited_masquerade": "mailgate does not masquerade addresses",
    "masquerade_entire_domain": "mailgate does not masquerade addresses",
    "masquerade_envelope": "mailgate does not masquerade addresses",
    "local_no_masquerade": "mailgate does not masquerade addresses",
    "always_add_domain": "mailgate adds @$j only to unqualified header addresses of mail it"
    " receives (as Sendmail does without this feature)",
    "lookupdotdomain": "access keys .domain are not looked up by mailgate",
    "nouucp": "mailgate always reads '!' in a local part as routing (semantics §1)",
    "nopercenthack": "mailgate always reads '%' in a local part as routing (semantics §1)",
    "stickyhost": "user@localname is not kept apart from user for LUSER_RELAY",
    "notsticky": "user@localname is not kept apart from user for LUSER_RELAY",
    "preserve_luser_host": "mailgate has no LUSER_RELAY",
    "preserve_local_plus_detail": "+detail is not passed to the local mailer",
    "bestmx_is_local": "domains whose best MX is this host are not local in mailgate: list"
    " them in local-host-names",
    "authinfo": "mailgate's SMTP client does not authenticate to next hops",
    "ldap_routing": "mailgate has no LDAP maps: export the routes to mailertable",
    "queuegroup": "mailgate has one queue",
    "bcc": "mailgate has no bcc feature",
    "compat_check": "mailgate has no check_compat rules",
    "check_other": "mailgate has no check_other rules",
    "mtamark": "mailgate does not look up MTA marks",
    "prefixmod": "mailgate has no prefix modification",
    "tls_failures": "mailgate's TLS failure handling is fixed",
    "tls_session_features": "mailgate has no per-session TLS features",
    "sts": "mailgate does not use MTA-STS",
    "use_client_ptr": "access lookups use the verified PTR name (as without this feature)",
    "check_cert_altnames": "mailgate does not verify next hops' certificates",
    "drac": "mailgate has no DRAC (POP-before-SMTP) relaying",
    "uucpdomain": "mailgate has no UUCP domain table",
    "bitdomain": "mailgate has no BITNET domain table",
    "domainmap": "mailgate has no domainmap",
    "vnet": "mailgate has no VNET domain table",
}

# FEATUREs that make an open relay or relay on forgeable facts: never imported.
OPEN_RELAY = {
    "promiscuous_relay": "it lets anyone relay mail through this host to anywhere: an open"
    " relay, abused for spam within hours and then listed in every block list",
    "loose_relay_check": "it lets clients relay with user%host@yourdomain addresses: an open"
    " relay through the % hack",
    "relay_local_from": "it lets anyone relay who writes a local domain as MAIL FROM, which"
    " every spammer can forge",
    "relay_mail_from": "it lets anyone relay whose MAIL FROM has an access From: RELAY entry,"
    " which every spammer can forge",
}

# FEATUREs that turn a safety check off: imported only with --allow-unsafe.
UNSAFE = {
    "accept_unresolvable_domains": (
        "smtp",
        "check_sender_domain",
        "it accepts senders whose domain does not exist in DNS: bounces to forged and"
        " mistyped senders cannot be delivered and pile up, and much spam comes from such"
        " domains",
    ),
    "accept_unqualified_senders": (
        "smtp",
        "require_qualified_sender",
        "it accepts MAIL FROM without a domain: such mail cannot be answered, and bounces"
        " to it are lost",
    ),
}

# The table features: FEATURE name → the file mailgate reads in the mail dir.
TABLE_FEATURES = {
    "mailertable": "mailertable",
    "virtusertable": "virtusertable",
    "domaintable": "domaintable",
    "access_db": "access",
}

MAILER_NOTES = {
    "local": "the local and prog mailers: mailgate delivers local mail itself (Maildir, files,"
    " programs)",
    "smtp": "the smtp, esmtp, smtp8, dsmtp and relay mailers: built into mailgate",
}

PORTS = {"smtp": 25, "submission": 587, "smtps": 465}

# Privacy flags: which of them mailgate acts on, and what happens with the others.
PRIVACY_IGNORED = {
    "goaway": "VRFY, EXPN and VERB are refused anyway; the other goaway flags are not acted on",
    "needmailhelo": "MAIL without HELO/EHLO is accepted",
    "needexpnhelo": "",  # EXPN is refused anyway
    "needvrfyhelo": "",  # VRFY never reveals a user anyway
    "noetrn": "ETRN is still answered",
    "noreceipts": "return receipts (NOTIFY=SUCCESS) are still sent",
    "nobodyreturn": "bounces still carry the message body",
    "noactualrecipient": "",  # mailgate's DSNs carry no X-Actual-Recipient of aliases
    "restrictmailq": "",  # mailgate mailq needs read access to the spool anyway
    "restrictqrun": "",  # mailgate flush needs write access to the spool anyway
    "restrictexpand": "",  # mailgate has no sendmail -bv
    "public": "",
}

# define(name, …) with nothing to set in mailgate: what it is.
NOTE_DEFINES = {
    "MAIL_SETTINGS_DIR": "Sendmail's settings directory: its tables are read from the mail dir",
    "QUEUE_DIR": "Sendmail's queue: mailgate keeps its own (spool_dir)",
    "confQUEUE_DIR": "Sendmail's queue: mailgate keeps its own (spool_dir)",
    "confPID_FILE": "Sendmail's pid file: mailgate's is pid_file, in spool_dir by default",
    "STATUS_FILE": "Sendmail's statistics file: mailgate logs statistics lines instead",
    "HELP_FILE": "the SMTP HELP text: mailgate's is built in",
    "confHELP_FILE": "the SMTP HELP text: mailgate's is built in",
    "confFORWARD_PATH": ".forward files: mailgate does not read them",
    "confDONT_PROBE_INTERFACES": "class w from the interfaces: mailgate adds its listen addresses",
    "confDONT_BLAME_SENDMAIL": "file safety checks of Sendmail: nothing to set",
    "confTO_IDENT": "ident lookups: mailgate does none",
    "confEBINDIR": "where Sendmail's helper programs are: nothing to set",
    "confTIME_ZONE": "time zone of Sendmail's processes: mailgate uses the system's",
    "confCF_VERSION": "a version string in sendmail.cf: nothing to set",
    "confDEF_USER_ID": "the user Sendmail runs mailers as: mailgate runs as who starts it",
    "confRUN_AS_USER": "the user Sendmail runs as: mailgate runs as who starts it",
    "confTRUSTED_USERS": "users trusted for sendmail -f: nothing to set",
    "confTRUSTED_USER": "the user trusted with Sendmail's files: nothing to set",
    "confCT_FILE": "the class t file FEATURE(use_ct_file) reads (given before it)",
    "confSMTP_MAILER": "the mailer for MX routes: mailgate uses esmtp (EHLO, falling back to HELO)",
    "confRELAY_MAILER": "the mailer for relay hosts: mailgate uses its SMTP client",
    "confMCI_CACHE_SIZE": "connection cache: mailgate keeps idle next-hop connections 5 s",
    "confMCI_CACHE_TIMEOUT": "connection cache: mailgate keeps idle next-hop connections 5 s",
    "confDELIVERY_MODE": "delivery mode: mailgate delivers at once, from the fsync'd queue",
    "confSAFE_QUEUE": "queue safety: mailgate fsyncs every message before 250",
    "confEIGHT_BIT_HANDLING": "8-bit mail: mailgate passes it to hops with 8BITMIME and"
    " converts it for the others",
    "confSEVEN_BIT_INPUT": "mailgate keeps the 8th bit",
    "confCACERT": "CA certificates for client certificates: mailgate does not verify clients",
    "confCACERT_PATH": "CA certificates for client certificates: mailgate does not verify clients",
    "confMAILER_NAME": "the sender name of bounces: mailgate uses MAILER-DAEMON",
    "confCW_FILE": "",  # table paths: handled apart
    "confCR_FILE": "",
    "ALIAS_FILE": "",
    "confALIAS_FILE": "",
    "confINPUT_MAIL_FILTERS": "",  # milters: handled apart
    "confMILTER_MACROS_CONNECT": "",  # each [[milter]] gets the list: handled apart
    "confMILTER_MACROS_HELO": "",
    "confMILTER_MACROS_ENVFROM": "",
    "confMILTER_MACROS_ENVRCPT": "",
    "confMILTER_MACROS_DATA": "",
    "confMILTER_MACROS_EOH": "",
    "confMILTER_MACROS_EOM": "",
    "confHOST_STATUS_DIRECTORY": "host status cache: mailgate's is in memory",
    "confTO_QUEUERETURN_URGENT": "",  # per priority: warned apart
    "confTO_QUEUEWARN_URGENT": "",
    "confTO_QUEUERETURN_NONURGENT": "",
    "confTO_QUEUEWARN_NONURGENT": "",
    "confTO_QUEUERETURN_DSN": "",
    "confTO_QUEUEWARN_DSN": "",
}

# define(name, …) mailgate has no equivalent for, beyond the generic text.
WARN_DEFINES = {
    "SMART_HOST": "a smart host is a mailertable '.' entry in mailgate: add the line"
    " '.  {mailer}' to mailertable (the tables are not changed by the import)",
    "MAIL_HUB": "mailgate has no mail hub: route local mail with aliases",
    "LUSER_RELAY": "mailgate has no LUSER_RELAY: unknown local users get 550 5.1.1",
    "LOCAL_RELAY": "mailgate has no LOCAL_RELAY",
    "confFALLBACK_MX": "mailgate has no fallback MX host: a mailertable entry can list"
    " fallback hosts (smtp:hosta:hostb)",
    "confFALLBACK_SMARTHOST": "mailgate has no fallback smart host: a mailertable entry can"
    " list fallback hosts",
    "confREFUSE_LA": "mailgate does not look at the load average; [smtp] max_connections and"
    " stress mode limit the load",
    "confQUEUE_LA": "mailgate does not look at the load average",
    "confDELAY_LA": "mailgate does not look at the load average",
    "confMIN_QUEUE_AGE": "mailgate retries after [queue] retry_min, doubling up to run_interval",
    "confAUTH_MECHANISMS": "mailgate offers no SMTP AUTH",
    "confAUTH_OPTIONS": "mailgate offers no SMTP AUTH",
    "confCLIENT_CERT": "mailgate's SMTP client presents no certificate",
    "confCLIENT_KEY": "mailgate's SMTP client presents no certificate",
    "confMAX_MIME_HEADER_LENGTH": "mailgate has no MIME header length limit",
    "confDEF_CHAR_SET": "mailgate labels unlabelled 8-bit text utf-8 (or unknown-8bit)",
    "confTO_ICONNECT": "mailgate has one connect timeout, [delivery] connect_timeout",
    "confMAX_QUEUE_RUN_SIZE": "mailgate's queue runs are bounded by [queue] max_deliveries",
}

# Timeouts of the SMTP client: one setting in mailgate scales them all.
CLIENT_TIMEOUTS = {
    "confTO_INITIAL",
    "confTO_HELO",
    "confTO_MAIL",
    "confTO_RCPT",
    "confTO_DATAINIT",
    "confTO_DATAFINAL",
    "confTO_RSET",
    "confTO_QUIT",
    "confTO_MISC",
    "confTO_STARTTLS",
    "confTO_LHLO",
    "confTO_AUTH",
}

MAILER_DEFINE = re.compile(r"[A-Z0-9]+_MAILER_[A-Z_]+")

# Sendmail's defaults where they decide behaviour and differ from mailgate's: written when
# the mc does not say otherwise, so the gateway behaves as before.
SENDMAIL_DEFAULTS: tuple[tuple[str, str, TomlValue, str], ...] = (
    ("smtp", "greet_pause", "0s", "no FEATURE(greet_pause): Sendmail greets at once"),
    (
        "smtp",
        "privacy",
        ["authwarnings"],
        "no confPRIVACY_FLAGS: Sendmail's default PrivacyOptions=authwarnings (VRFY, EXPN and"
        " VERB never reveal users in mailgate in any case)",
    ),
    (
        "smtp",
        "bad_rcpt_throttle",
        0,
        "no confBAD_RCPT_THROTTLE: Sendmail does not slow down clients that try bad recipients",
    ),
    (
        "smtp",
        "connection_rate_throttle",
        0,
        "no confCONNECTION_RATE_THROTTLE: Sendmail accepts connections as fast as they come",
    ),
    (
        "",
        "relay_hosts_only",
        False,
        "no FEATURE(relay_hosts_only): RELAY entries and relay-domains also cover subdomains,"
        " as in Sendmail",
    ),
)

# mailgate's protections Sendmail lacked by default: kept, and listed with Sendmail's value.
KEPT: tuple[tuple[str, str, str], ...] = (
    ("smtp", "max_message_size", "Sendmail: no limit without confMAX_MESSAGE_SIZE"),
    ("smtp", "max_recipients", "Sendmail: no limit without confMAX_RCPTS_PER_MESSAGE"),
    ("smtp", "command_timeout", "Sendmail: 1h (Timeout.command)"),
    ("smtp", "data_timeout", "Sendmail: 1h (Timeout.datablock)"),
    ("smtp", "max_connections", "Sendmail: no limit without confMAX_DAEMON_CHILDREN"),
    ("smtp", "max_connections_per_ip", "Sendmail: no limit without FEATURE(conncontrol)"),
    ("smtp", "max_bad_rcpts", "Sendmail: no limit"),
    ("queue", "min_free", "Sendmail: 100 blocks (MinFreeBlocks)"),
)


# Macros with nothing to set, and macros mailgate has no equivalent for.
NOTE_MACROS = {
    "EXPOSED_USER": "users exempt from masquerading: mailgate does not masquerade",
    "EXPOSED_USER_FILE": "users exempt from masquerading: mailgate does not masquerade",
    "LOCAL_USER": "users kept local with LUSER_RELAY: mailgate has no LUSER_RELAY",
    "LOCAL_USER_FILE": "users kept local with LUSER_RELAY: mailgate has no LUSER_RELAY",
    "CANONIFY_DOMAIN": "hosts not canonified: mailgate never canonifies",
    "CANONIFY_DOMAIN_FILE": "hosts not canonified: mailgate never canonifies",
    "MAILER_DEFINITIONS": "m4 output control: nothing to set",
    "errprint": "a message m4 prints: nothing to set",
}
WARN_MACROS = {
    "MASQUERADE_AS": "mailgate does not masquerade addresses",
    "MASQUERADE_DOMAIN": "mailgate does not masquerade addresses",
    "MASQUERADE_DOMAIN_FILE": "mailgate does not masquerade addresses",
    "MASQUERADE_EXCEPTION": "mailgate does not masquerade addresses",
    "MASQUERADE_EXCEPTION_FILE": "mailgate does not masquerade addresses",
    "GENERICS_DOMAIN": "mailgate does not rewrite sender addresses",
    "GENERICS_DOMAIN_FILE": "mailgate does not rewrite sender addresses",
    "HACK": "the hack's rules are not read by the importer",
    "SITECONFIG": "UUCP site configuration: not read by the importer",
    "SITE": "UUCP site configuration: not read by the importer",
    "QUEUE_GROUP": "mailgate has one queue",
    "LDAPROUTE_DOMAIN": "mailgate has no LDAP maps",
    "LDAPROUTE_DOMAIN_FILE": "mailgate has no LDAP maps",
    "TRUST_AUTH_MECH": "mailgate offers no SMTP AUTH",
    "MODIFY_MAILER_FLAGS": "mailgate's mailers have no flags",
    "ifelse": "m4 conditionals are not evaluated; check by hand",
}
