"""The ``securefl`` command.  Thin: parse arguments, call a library function, map errors.

Exit status (also in ``securefl --help``): 0 when the work asked for is done, 1 when it
failed or a check failed, 2 for a usage or configuration error, 130 when interrupted.  A
user error (:class:`~securefl.errors.SecureFLError`) prints one line and no traceback; so does
an unexpected failure, whose traceback ``-v`` shows.  Each sub-command's handler is imported
only when it runs, so ``securefl --help`` and start-up stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from securefl.errors import RunFailed, SecureFLError

__all__ = ["main"]

# sub-command path -> "module:function"; each function takes the parsed Namespace, returns
# the exit status.
_HANDLERS = {
    ("run",): "securefl.simulation:command",
    ("check",): "securefl.report.check:command",
    ("report",): "securefl.report:command",
    ("privacy", "report"): "securefl.report.privacy:command",
    ("privacy", "audit"): "securefl.attacks.audit:command",
    ("attack", "run"): "securefl.attacks.harness:command",
    ("certs", "init"): "securefl.runtime.tls:command",
    ("certs", "renew"): "securefl.runtime.tls:renew_command",
    ("server",): "securefl.runtime.server:command",
    ("client",): "securefl.runtime.client:command",
    ("audit", "verify"): "securefl.runtime.auditlog:command",
}


_EPILOG = """exit status:
  0    the work asked for is done
  1    the work failed, or a check failed (one line says why)
  2    usage or configuration error
  130  interrupted
"""


def _verbosity(*, top: bool) -> argparse.ArgumentParser:
    """-v/-q, accepted before and after the sub-command (the later one wins)."""
    common = argparse.ArgumentParser(add_help=False)
    default = False if top else argparse.SUPPRESS
    common.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log progress and debug detail")
    common.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="errors only, no progress output")
    return common


def _parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("securefl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        release = "unknown"
    parser = argparse.ArgumentParser(
        prog="securefl", description="Federated learning with privacy and security built in.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_verbosity(top=True)])
    parser.add_argument("--version", action="version", version=f"securefl {release}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _verbosity(top=False)

    def add(group: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return group.add_parser(name, parents=[common], **kwargs)

    run = add(sub, "run", help="run a simulation from a TOML config")
    run.add_argument("config", help="TOML config file")
    run.add_argument("--out", help="run directory (default: runs/<name>-<timestamp>)")
    run.add_argument("--rounds", type=_at_least(1), help="override [run] rounds")
    run.add_argument("--seed", type=int, help="override [run] seed")
    run.add_argument("--overwrite", action="store_true",
                     help="write into an --out directory that already holds files")

    check = add(sub, "check", help="check a config against a threat model")
    check.add_argument("config")
    check.add_argument("--threat-model", help="threat model name or TOML file "
                       "(default: the config's [run] threat_model)")
    check.add_argument("--deployment", choices=("simulation", "network"), default="simulation",
                       help="check for an in-process run (default) or a networked deployment")

    report = add(sub, "report", help="write the compliance report of a run (HTML, MD)")
    report.add_argument("run_dir")

    privacy = add(sub, "privacy", help="privacy budgets and audits")
    privacy_sub = privacy.add_subparsers(dest="action", required=True, metavar="ACTION")
    privacy_report = add(privacy_sub, "report", help="per-client epsilon table and plot")
    privacy_report.add_argument("run_dir")
    audit = add(privacy_sub, "audit", help="empirical epsilon lower bound with canaries")
    audit.add_argument("config")
    audit.add_argument("--out", help="output directory for audit.json and audit-scores.png "
                       "(default: the working directory)")
    audit.add_argument("--seed", type=int, help="override [run] seed")
    audit.add_argument("--canary", choices=("gradient", "client", "input"), default=None,
                       help="white-box Dirac gradient canaries (default for DP-SGD or no DP), "
                       "canary clients (default for DP-FedAvg) or mislabelled input canaries")
    audit.add_argument("--canaries", type=_at_least(2), default=None,
                       help="canaries, each inserted with probability 1/2 (default 1000 "
                       "gradient, 5000 client, 200 input)")
    audit.add_argument("--gate", action="store_true",
                       help="exit 1 when the lower bound exceeds the accountant's epsilon")
    audit.add_argument("--confidence", type=_open_unit, default=0.95,
                       help="confidence of the lower bound (default 0.95)")

    attack = add(sub, "attack", help="attack/defense evaluation")
    attack_sub = attack.add_subparsers(dest="action", required=True, metavar="ACTION")
    attack_run = add(attack_sub, "run", help="run an attack scenario grid")
    attack_run.add_argument("scenario", nargs="+", help="scenario TOML file(s)")
    attack_run.add_argument("--out", help="output directory")
    attack_run.add_argument("--results", help="also regenerate this RESULTS.md")
    attack_run.add_argument("--jobs", type=int, default=1, metavar="N",
                            help="run up to N cells at once, each in its own process "
                                 "(default 1)")

    certs = add(sub, "certs", help="TLS certificates for a deployment")
    certs_sub = certs.add_subparsers(dest="action", required=True, metavar="ACTION")
    certs_init = add(certs_sub, "init", help="create a CA, a server and site certificates")
    certs_init.add_argument("dir")
    certs_init.add_argument("--sites", help="comma-separated site names (required unless "
                            "--he-only)")
    certs_init.add_argument("--server-name", default="localhost",
                            help="server DNS name or IP (default: localhost)")
    certs_init.add_argument("--days", type=int, default=365, help="leaf validity in days")
    certs_init.add_argument("--he", metavar="CONFIG",
                            help="also generate fresh CKKS keys for this config's "
                            "[protection.he] (one set per federation run)")
    certs_init.add_argument("--he-only", action="store_true",
                            help="rotate only the CKKS keys (with --he), for a new run; the "
                            "TLS material and site identities stay")

    certs_renew = add(certs_sub, "renew", help="re-issue site certificates from the CA")
    certs_renew.add_argument("dir")
    certs_renew.add_argument("--sites", required=True, help="comma-separated site names")
    certs_renew.add_argument("--days", type=int, default=365, help="validity in days")

    server = add(sub, "server", help="run the federation server (gRPC, mTLS)")
    server.add_argument("config")
    server.add_argument("--resume", action="store_true", help="continue from the last round")
    server.add_argument("--out", help="state directory (default from the config)")

    client = add(sub, "client", help="run one site's client (gRPC, mTLS)")
    client.add_argument("config")
    client.add_argument("--site", help="site name (default from the config)")
    client.add_argument("--new-run", action="store_true",
                        help="join a new run (the site otherwise stays in the run it joined)")

    audit_cmd = add(sub, "audit", help="tamper-evident audit log")
    audit_sub = audit_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = add(audit_sub, "verify", help="verify a run's signed hash chain")
    verify.add_argument("run_dir")
    verify.add_argument("--public-key", help="the server's audit key (64 hex digits or a file "
                        "with them), kept outside the server; default: audit.pub in RUN_DIR")
    verify.add_argument("--identities", help="identities.json (or its folder): the sites' "
                        "pinned keys; checks the sites' countersignatures and receipts")
    verify.add_argument("--site-head", action="append", metavar="FILE",
                        help="a site's audit-head-<site>-<run>.json (repeatable)")
    return parser


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _open_unit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO
    # securefl's own progress at INFO; other libraries only when something needs attention
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("securefl").setLevel(level)
    key = (args.command, args.action) if hasattr(args, "action") else (args.command,)
    module_name, function_name = _HANDLERS[key].split(":")
    try:
        module = (_import_starting_ray(args.config, module_name) if key == ("run",)
                  else importlib.import_module(module_name))
        handler = getattr(module, function_name)
        return int(handler(args) or 0)
    except RunFailed as exc:
        print(f"securefl: failed: {exc}", file=sys.stderr)
        return 1
    except SecureFLError as exc:
        print(f"securefl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("securefl: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an environment failure: one line, -v for the trace
        if args.verbose:
            raise
        print(f"securefl: failed: {type(exc).__name__}: {exc} (run with -v for the "
              "traceback)", file=sys.stderr)
        return 1
    finally:
        if key == ("run",):
            from securefl.engine.ray_backend import abandon_early_start

            abandon_early_start()


def _import_starting_ray(path: str, module_name: str) -> Any:
    """Import ``module_name``; for ``[simulation] backend = "ray"``, start Ray meanwhile
    (:func:`~securefl.engine.ray_backend.start_early`).  This reads only the file's
    ``[simulation]`` table; any error in the file is the full load's to report."""
    import tomllib

    try:
        with open(path, "rb") as handle:
            table = tomllib.load(handle).get("simulation", {})
    except (OSError, tomllib.TOMLDecodeError):
        table = {}
    address = table.get("address") if isinstance(table, dict) else None
    if not (isinstance(table, dict) and table.get("backend") == "ray" and (
            address is None or isinstance(address, str))):
        return importlib.import_module(module_name)
    from securefl.engine.ray_backend import start_early

    return start_early(address or None, lambda: importlib.import_module(module_name))


if __name__ == "__main__":
    sys.exit(main())
