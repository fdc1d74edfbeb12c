"""The ``securefl`` command.  Thin: parse arguments, call a library function, map errors.

User errors (:class:`~securefl.errors.SecureFLError`) print one line and exit 2 with no
traceback.  Each sub-command's handler is imported only when it runs, so ``securefl --help``
and start-up stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from securefl.errors import SecureFLError

__all__ = ["main"]

# sub-command path -> "module:function"; each function takes the parsed Namespace, returns
# the exit status.
_HANDLERS = {
    ("run",): "securefl.experiment:command",
    ("check",): "securefl.threat:command",
    ("report",): "securefl.report:command",
    ("privacy", "report"): "securefl.privacy.report:command",
    ("privacy", "audit"): "securefl.privacy.audit:command",
    ("attack", "run"): "securefl.attacks.harness:command",
    ("certs", "init"): "securefl.runtime.tls:command",
    ("certs", "renew"): "securefl.runtime.tls:renew_command",
    ("server",): "securefl.runtime.server:command",
    ("client",): "securefl.runtime.client:command",
    ("audit", "verify"): "securefl.runtime.auditlog:command",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="securefl", description="Federated learning with privacy and security built in.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a simulation from a TOML config")
    run.add_argument("config", help="TOML config file")
    run.add_argument("--out", help="run directory (default: runs/<name>-<timestamp>)")
    run.add_argument("--rounds", type=int, help="override [run] rounds")
    run.add_argument("--seed", type=int, help="override [run] seed")
    run.add_argument("--quiet", action="store_true", help="no progress output")

    check = sub.add_parser("check", help="check a config against a threat model")
    check.add_argument("config")
    check.add_argument("--threat-model", help="threat model name or TOML file "
                       "(default: the config's [run] threat_model)")
    check.add_argument("--deployment", choices=("simulation", "network"), default="simulation",
                       help="check for an in-process run (default) or a networked deployment")

    report = sub.add_parser("report", help="write the compliance report of a run (HTML, MD)")
    report.add_argument("run_dir")

    privacy = sub.add_parser("privacy", help="privacy budgets and audits")
    privacy_sub = privacy.add_subparsers(dest="action", required=True, metavar="ACTION")
    privacy_report = privacy_sub.add_parser("report", help="per-client epsilon table and plot")
    privacy_report.add_argument("run_dir")
    audit = privacy_sub.add_parser("audit", help="empirical epsilon lower bound with canaries")
    audit.add_argument("config")
    audit.add_argument("--out", help="output directory")
    audit.add_argument("--seed", type=int, help="override [run] seed")
    audit.add_argument("--canaries", type=int, default=200,
                       help="mislabelled canaries, each inserted with probability 1/2 "
                       "(default 200)")
    audit.add_argument("--confidence", type=float, default=0.95,
                       help="confidence of the lower bound (default 0.95)")

    attack = sub.add_parser("attack", help="attack/defense evaluation")
    attack_sub = attack.add_subparsers(dest="action", required=True, metavar="ACTION")
    attack_run = attack_sub.add_parser("run", help="run an attack scenario grid")
    attack_run.add_argument("scenario", nargs="+", help="scenario TOML file(s)")
    attack_run.add_argument("--out", help="output directory")
    attack_run.add_argument("--results", help="also regenerate this RESULTS.md")

    certs = sub.add_parser("certs", help="TLS certificates for a deployment")
    certs_sub = certs.add_subparsers(dest="action", required=True, metavar="ACTION")
    certs_init = certs_sub.add_parser("init", help="create a CA, a server and site certificates")
    certs_init.add_argument("dir")
    certs_init.add_argument("--sites", required=True, help="comma-separated site names")
    certs_init.add_argument("--server-name", default="localhost",
                            help="server DNS name or IP (default: localhost)")
    certs_init.add_argument("--days", type=int, default=365, help="leaf validity in days")
    certs_init.add_argument("--he", metavar="CONFIG",
                            help="also generate CKKS keys for this config's [protection.he]")

    certs_renew = certs_sub.add_parser("renew", help="re-issue site certificates from the CA")
    certs_renew.add_argument("dir")
    certs_renew.add_argument("--sites", required=True, help="comma-separated site names")
    certs_renew.add_argument("--days", type=int, default=365, help="validity in days")

    server = sub.add_parser("server", help="run the federation server (gRPC, mTLS)")
    server.add_argument("config")
    server.add_argument("--resume", action="store_true", help="continue from the last round")
    server.add_argument("--out", help="state directory (default from the config)")

    client = sub.add_parser("client", help="run one site's client (gRPC, mTLS)")
    client.add_argument("config")
    client.add_argument("--site", help="site name (default from the config)")

    audit_cmd = sub.add_parser("audit", help="tamper-evident audit log")
    audit_sub = audit_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = audit_sub.add_parser("verify", help="verify a run's signed hash chain")
    verify.add_argument("run_dir")
    verify.add_argument("--public-key", help="the server's audit key (64 hex digits or a file "
                        "with them), kept outside the server; default: audit.pub in RUN_DIR")
    verify.add_argument("--identities", help="identities.json (or its folder): the sites' "
                        "pinned keys; checks the sites' countersignatures and receipts")
    verify.add_argument("--site-head", action="append", metavar="FILE",
                        help="a site's audit-head-<run>.json (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    key = (args.command, args.action) if hasattr(args, "action") else (args.command,)
    module_name, function_name = _HANDLERS[key].split(":")
    try:
        handler = getattr(importlib.import_module(module_name), function_name)
        return int(handler(args) or 0)
    except SecureFLError as exc:
        print(f"securefl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("securefl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
