"""Certificates for a deployment: a private CA, the server certificate, one certificate per site.

``securefl certs init DIR --sites a,b,c`` writes::

    DIR/ca.pem  DIR/ca.key              the federation's certificate authority (ECDSA P-256)
    DIR/server.pem  DIR/server.key      serverAuth leaf; SAN = --server-name (DNS name or IP)
    DIR/sites/<site>.pem  .key          clientAuth leaf per site; subject CN = site
    DIR/allowlist.toml                  [network.allowlist] site = "<SHA-256 fingerprint>"
    DIR/sites/<site>.identity, DIR/identities.json   protection identities (runtime.deploy)

Private keys are written with mode 0600.  The CA is valid ten times as long as a leaf.
Transport security is mutual TLS (RFC 8446 with client authentication): the server accepts a
client only when its certificate chains to the CA *and* its SHA-256 fingerprint (of the DER
encoding) is the one pinned for that site in the server's allowlist.  A site's identity is its
certificate, never a name it claims.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import ipaddress
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securefl.config.network import SITE_NAMES, NetworkConfig, valid_site_name
from securefl.errors import ConfigError
from securefl.output import atomic_write

__all__ = [
    "certificate_problem",
    "client_credentials",
    "command",
    "fingerprint",
    "init_certificates",
    "issue_site_certificate",
    "peer_certificate",
    "server_credentials",
    "site_for",
    "site_paths",
]

_UTC = dt.UTC


def fingerprint(pem: bytes) -> str:
    """Lower-case hex SHA-256 of the certificate's DER encoding (what the allowlist pins)."""
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def certificate_problem(pem: bytes, *, now: dt.datetime | None = None) -> str | None:
    """Why the certificate is unusable right now (expired, not yet valid), or ``None``."""
    cert = x509.load_pem_x509_certificate(pem)
    moment = now or dt.datetime.now(_UTC)
    if moment > cert.not_valid_after_utc:
        return f"certificate expired on {cert.not_valid_after_utc.isoformat()}"
    if moment < cert.not_valid_before_utc:
        return f"certificate not valid before {cert.not_valid_before_utc.isoformat()}"
    return None


def common_name(pem: bytes) -> str:
    """The subject CN of a certificate (a site's name, as ``certs init`` issues them)."""
    names = x509.load_pem_x509_certificate(pem).subject.get_attributes_for_oid(
        NameOID.COMMON_NAME)
    return str(names[0].value)[:64] if names else "?"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "securefl federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _leaf(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str, *,
          usage: x509.ObjectIdentifier, san: list[x509.GeneralName], days: int,
          not_before: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_before + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=True, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def _server_names(server_name: str) -> list[x509.GeneralName]:
    """SAN entries: the name itself; ``localhost`` also covers the loopback addresses."""
    try:
        return [x509.IPAddress(ipaddress.ip_address(server_name))]
    except ValueError:
        pass
    names: list[x509.GeneralName] = [x509.DNSName(server_name)]
    if server_name == "localhost":
        names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                  x509.IPAddress(ipaddress.ip_address("::1"))]
    return names


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{directory}: no usable CA (ca.pem, ca.key): {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{directory}/ca.key: expected an EC private key")
    return cert, key


def site_paths(directory: str | Path, site: str) -> tuple[Path, Path]:
    """``(certificate, private key)`` paths of ``site`` inside a certs folder; a name that
    is not a site name (``../x``, ``a b``) is refused before any path is built from it."""
    if not valid_site_name(site):
        raise ConfigError(f"site name {site!r} is not allowed: site names are {SITE_NAMES}")
    base = Path(directory) / "sites"
    return base / f"{site}.pem", base / f"{site}.key"


def issue_site_certificate(directory: str | Path, site: str, *, days: int = 365,
                           not_before: dt.datetime | None = None) -> str:
    """Issue (or re-issue) the client certificate of ``site``; returns its fingerprint.

    ``not_before`` defaults to one hour ago (clock skew between sites).
    """
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    directory = Path(directory)
    ca_cert, ca_key = _load_ca(directory)
    start = not_before or dt.datetime.now(_UTC) - dt.timedelta(hours=1)
    cert, key = _leaf(ca_cert, ca_key, site, usage=ExtendedKeyUsageOID.CLIENT_AUTH,
                      san=[x509.DNSName(site)], days=days, not_before=start)
    cert_path, key_path = site_paths(directory, site)
    atomic_write(key_path, _key_pem(key), mode=0o600)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(pem)
    return fingerprint(pem)


def init_certificates(directory: str | Path, sites: Sequence[str], *,
                      server_name: str = "localhost", days: int = 365) -> dict[str, str]:
    """Create the CA, the server certificate and one certificate per site.

    Returns the allowlist ``{site: fingerprint}`` (also written to ``allowlist.toml``).
    Refuses to overwrite an existing CA, so that a deployment's trust root never silently
    changes.
    """
    directory = Path(directory)
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    if not sites or len(set(sites)) != len(sites):
        raise ValueError(f"sites must be distinct and non-empty, got {list(sites)}")
    for site in sites:
        site_paths(directory, site)  # refuses a name that is not a site name
    if (directory / "ca.key").exists():
        raise ConfigError(f"{directory}: a CA already exists; choose an empty folder")
    now = dt.datetime.now(_UTC) - dt.timedelta(hours=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("securefl federation CA")
    ca_cert = (x509.CertificateBuilder()
               .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now)
               .not_valid_after(now + dt.timedelta(days=10 * days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, key_encipherment=False,
                                            content_commitment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "ca.key", _key_pem(ca_key), mode=0o600)
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    server_cert, server_key = _leaf(ca_cert, ca_key, server_name,
                                    usage=ExtendedKeyUsageOID.SERVER_AUTH,
                                    san=_server_names(server_name), days=days, not_before=now)
    atomic_write(directory / "server.key", _key_pem(server_key), mode=0o600)
    (directory / "server.pem").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    allowlist = {site: issue_site_certificate(directory, site, days=days, not_before=now)
                 for site in sites}
    from securefl.runtime.keys import init_identities

    init_identities(directory, sites)
    (directory / "allowlist.toml").write_text(allowlist_toml(allowlist))
    return allowlist


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read TLS material ({exc.strerror})") from None


def server_credentials(config: NetworkConfig) -> grpc.ServerCredentials:
    """mTLS server credentials: present ``server.pem``, require a client cert from ``ca.pem``."""
    if config.certs is None:
        raise ConfigError("[network] certs is required unless insecure = true")
    base = Path(config.certs)
    return grpc.ssl_server_credentials(
        [(_read(base / "server.key"), _read(base / "server.pem"))],
        root_certificates=_read(base / "ca.pem"), require_client_auth=True)


def client_credentials(config: NetworkConfig, site: str) -> grpc.ChannelCredentials:
    """mTLS channel credentials of ``site``: trust only the federation CA, present the site cert."""
    if config.certs is None:
        raise ConfigError("[network] certs is required unless insecure = true")
    cert_path, key_path = site_paths(config.certs, site)
    return grpc.ssl_channel_credentials(root_certificates=_read(Path(config.certs) / "ca.pem"),
                                        private_key=_read(key_path),
                                        certificate_chain=_read(cert_path))


def peer_certificate(context: Any) -> bytes | None:
    """The PEM certificate the peer presented in the TLS handshake (``None`` without TLS)."""
    values = context.auth_context().get("x509_pem_cert")
    return bytes(values[0]) if values else None


def site_for(pem: bytes, allowlist: Mapping[str, str]) -> str | None:
    """The site whose pinned fingerprint matches ``pem``, or ``None``."""
    digest = fingerprint(pem)
    return next((site for site, pinned in allowlist.items() if pinned == digest), None)


def renew_command(args: argparse.Namespace) -> int:
    """``securefl certs renew DIR --sites a,b [--days N]``: re-issue site certificates from
    the federation CA (new key, new validity) and print their new allowlist entries."""
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    if not sites:
        raise ConfigError("--sites names no site")
    try:
        renewed = {site: issue_site_certificate(args.dir, site, days=args.days)
                   for site in sites}
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{args.dir}: cannot renew ({exc})") from None
    print(f"renewed {len(renewed)} site certificates in {args.dir} for {args.days} days; "
          "replace these entries in the server's [network.allowlist] and restart it "
          "(--resume), then copy sites/<site>.pem and .key to each site")
    print(allowlist_toml(renewed), end="")
    return 0


def command(args: argparse.Namespace) -> int:
    """``securefl certs init DIR --sites a,b,c [--he CONFIG]``: print the allowlist to paste
    into the config; ``--he CONFIG --he-only`` rotates only the CKKS keys for a new run."""
    if getattr(args, "he_only", False):
        if not getattr(args, "he", None):
            raise ConfigError("--he-only needs --he CONFIG")
        from securefl.config import load_config
        from securefl.runtime.keys import init_he_context

        init_he_context(args.dir, load_config(args.he).protection.he)
        print(f"wrote fresh CKKS contexts to {args.dir}/he (secret.ctx: sites only); copy "
              "secret.ctx to every site and public.ctx to the server before the new run")
        return 0
    if not args.sites:
        raise ConfigError("certs init needs --sites a,b,c")
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    try:
        allowlist = init_certificates(args.dir, sites, server_name=args.server_name,
                                      days=args.days)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if getattr(args, "he", None):
        from securefl.config import load_config
        from securefl.runtime.keys import init_he_context

        init_he_context(args.dir, load_config(args.he).protection.he)
        print(f"wrote the CKKS contexts to {args.dir}/he (secret.ctx: sites only)")
    print(f"wrote CA, server and {len(sites)} site certificates to {args.dir}")
    print(allowlist_toml(allowlist), end="")
    return 0


def allowlist_toml(allowlist: dict[str, str]) -> str:
    """The ``[network.allowlist]`` table to paste into a config (quoted keys: a site name
    may hold a '.', which a bare TOML key would split)."""
    return "[network.allowlist]\n" + "".join(f'"{site}" = "{digest}"\n'
                                             for site, digest in allowlist.items())
