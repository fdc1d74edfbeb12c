"""The two halves of a deployed protection, built from the key material that
:mod:`securefl.runtime.keys` writes.

``securefl certs init`` writes, next to the TLS material:

* ``sites/<site>.identity`` — the site's long-term Ed25519 identity key (mode 0600), used by
  secure aggregation to sign key advertisements and by HE to sign uploads;
* ``identities.json`` — ``{site: hex Ed25519 public key}``, the public directory that the
  server *and every site* load from disk, so a malicious server cannot substitute keys
  (SecAgg+ assumes such a PKI: Bell et al., CCS 2020, Sec. 3);
* with ``--he CONFIG``: ``he/secret.ctx`` (the CKKS secret context, for the sites only) and
  ``he/public.ctx`` (the public context, the only one the server ever reads).  CKKS keys
  are fresh for every federation run: a site refuses a key id it has used in another run,
  so a new run needs ``securefl certs init DIR --he CONFIG --he-only`` (new keys, the TLS
  material and identities kept).

The server's half is built from public material only; a site's half from its own secrets.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefl.build import load_config
from securefl.config import Config
from securefl.engine.protection import ClientProtection, Plain, ServerProtection
from securefl.errors import ConfigError
from securefl.he.packing import Selection
from securefl.vector import Layout

__all__ = ["check_rounds", "identity_directory", "load_deployment", "load_identity",
           "server_protection", "site_protection"]


def load_deployment(path: str | Path) -> Config:
    """:func:`~securefl.config.load_config`, with the relative file paths of ``[network]``
    (``certs``, ``state_dir``, ``client_state_dir``) and ``[data] path`` resolved from the
    config file's folder, not from wherever the command runs."""
    config = load_config(path)
    base = Path(path).resolve().parent

    def resolve(value: str | None) -> str | None:
        if value is None or Path(value).is_absolute():
            return value
        return str(base / value)

    net = config.network
    return config.replace(
        network=dataclasses.replace(net, certs=resolve(net.certs),
                                    state_dir=resolve(net.state_dir) or net.state_dir,
                                    client_state_dir=resolve(net.client_state_dir)),
        data=dataclasses.replace(config.data, path=resolve(config.data.path)))


def _certs(config: Config) -> Path:
    if config.network.certs is None:
        raise ConfigError(f"[protection] kind = {config.protection.kind!r} over the network "
                          "needs [network] certs (the folder with identities.json)")
    return Path(config.network.certs)


def _directory(config: Config) -> dict[str, bytes]:
    path = _certs(config) / "identities.json"
    try:
        table = json.loads(path.read_text())
        return {site: bytes.fromhex(key) for site, key in table.items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path}: cannot read the identity directory ({exc})") from None


def identity_directory(config: Config, sites: Sequence[str]) -> dict[str, bytes]:
    """The pinned public identity keys of ``sites`` (every one must be present)."""
    directory = {s: k for s, k in _directory(config).items() if s in sites}
    missing = sorted(set(sites) - set(directory))
    if missing:
        raise ConfigError(f"identities.json has no key for sites {missing}")
    return directory


def load_identity(config: Config, site: str) -> Ed25519PrivateKey:
    """``site``'s own Ed25519 identity key (``certs/sites/<site>.identity``)."""
    return _identity(config, site)


def _identity(config: Config, site: str) -> Ed25519PrivateKey:
    path = _certs(config) / "sites" / f"{site}.identity"
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the site identity key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key")
    return key


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        raise ConfigError(f"{path}: missing; run `securefl certs init ... --he CONFIG`") from None


def _he_selection(config: Config, layout: Layout | None) -> Selection | None:
    from securefl.he import layer_selection

    return layer_selection(config.protection.he, layout)  # ConfigError on a bad pattern


def _he_keys(directory: Mapping[str, bytes]) -> dict[str, Ed25519PublicKey]:
    return {s: Ed25519PublicKey.from_public_bytes(k) for s, k in directory.items()}


def server_protection(config: Config, sites: Sequence[str], *, layout: Layout | None = None
                      ) -> ServerProtection:
    """The server's half, from public material only.

    ``layout`` (the model's) is needed when ``[protection.he] layers`` selects layers; server
    and sites build the same model from the config, so they select the same coordinates.
    """
    kind = config.protection.kind
    if kind == "plain":
        return Plain()
    directory = identity_directory(config, sites)
    if kind == "secagg":
        from securefl.build import secagg_encoding
        from securefl.secagg import SecAggServerProtection

        return SecAggServerProtection(directory=directory, config=config.protection.secagg,
                                      encoding=secagg_encoding(config, len(directory)))
    from securefl.he import HEServerProtection

    if config.server.evaluate != "federated":
        raise ConfigError("[server] evaluate: HE keeps the global model encrypted at the "
                          "server, which can therefore not evaluate it; use evaluate = "
                          "\"federated\" (the sites evaluate the model they decrypt)")
    return HEServerProtection.from_bytes(
        _read(_certs(config) / "he" / "public.ctx"), verify_keys=_he_keys(directory),
        min_contributors=config.protection.he.min_contributors,
        selection=_he_selection(config, layout), resum=config.protection.he.resum)


def site_protection(config: Config, site: str, sites: Sequence[str] | None = None, *,
                    layout: Layout | None = None, state_dir: Path | None = None
                    ) -> ClientProtection:
    """A site's half, from its own secrets and the public directory (``layout``: see
    :func:`server_protection`; HE needs it, and keeps its record of decrypted aggregates
    in ``state_dir``)."""
    kind = config.protection.kind
    if kind == "plain":
        return Plain()
    directory = _directory(config)
    if sites is not None:
        directory = {s: k for s, k in directory.items() if s in sites}
    identity = _identity(config, site)
    if kind == "secagg":
        from securefl.build import secagg_encoding
        from securefl.secagg import SecAggClientProtection

        return SecAggClientProtection(client_id=site, identity=identity, directory=directory,
                                      config=config.protection.secagg,
                                      encoding=secagg_encoding(config, len(directory)))
    from securefl.he import HEClientProtection
    from securefl.he.statelog import DecryptionLog

    if layout is None:
        raise ConfigError("HE needs the model layout at the site")
    log = DecryptionLog(None if state_dir is None else state_dir / f"he-decrypted-{site}.sqlite")
    return HEClientProtection.from_bytes(
        _read(_certs(config) / "he" / "secret.ctx"), client_id=site, signing_key=identity,
        verify_keys=_he_keys(directory), dimension=layout.size,
        min_contributors=config.protection.he.min_contributors,
        selection=_he_selection(config, layout), server_lr=config.server.lr,
        resum=config.protection.he.resum, log=log)


def check_rounds(config: Config) -> None:
    """What a deployment's config decides about its rounds, checked before the server waits
    for any site: under secure aggregation, a round that starts with the sites that
    ``[network] min_connected`` allows to be absent must still be able to finish
    (:mod:`securefl.secagg.tolerance`); otherwise it would abort after the sites present had
    trained and been charged for it."""
    if config.protection.kind != "secagg":
        return
    from securefl.secagg.tolerance import round_problem, round_shape, smallest_round

    secagg = config.protection.secagg
    sites = len(config.network.allowlist)
    per_round = config.server.per_round(sites)
    where = f"[protection] kind = \"secagg\" with {sites} sites in [network.allowlist]"
    if (problem := round_problem(per_round, secagg)) is not None:
        raise ConfigError(f"{where}: {problem}, but a round samples {per_round}; every round "
                          "would abort after the sites trained")
    wanted = config.network.min_connected or sites
    absent = min(per_round, max(0, sites - wanted))
    if round_problem(per_round - absent, secagg) is not None:
        shape = round_shape(per_round, secagg)
        need = sites - per_round + smallest_round(secagg)
        raise ConfigError(
            f"{where}: [network] min_connected = {wanted} lets a round start with {absent} of "
            f"its {per_round} sites absent, but {shape.describe() if shape else ''} and needs "
            f"at least {smallest_round(secagg)} sites present; set min_connected = {need} "
            "(the sites present would train, and be charged, for a round that aborts)")
