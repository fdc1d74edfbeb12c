"""Certificates: what `securefl certs init` writes, and the network configuration checks."""

from __future__ import annotations

import datetime as dt
import json
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from securefl.cli import main
from securefl.config import config_from_dict
from securefl.errors import ConfigError
from securefl.runtime.tls import certificate_problem, fingerprint, init_certificates


def test_certs_init_writes_ca_server_sites_with_private_keys_0600(tmp_path, capsys):
    assert main(["certs", "init", str(tmp_path / "c"), "--sites", "h1,h2,h3", "--days",
                 "30"]) == 0
    out = capsys.readouterr().out
    base = tmp_path / "c"
    keys = [base / "ca.key", base / "server.key",
            *(base / "sites" / f"h{i}.{ext}" for i in (1, 2, 3) for ext in ("key", "identity"))]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    ca = x509.load_pem_x509_certificate((base / "ca.pem").read_bytes())
    leaf = x509.load_pem_x509_certificate((base / "sites" / "h2.pem").read_bytes())
    assert leaf.issuer == ca.subject
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc) == dt.timedelta(days=30)
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc) == dt.timedelta(days=300)
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    digest = fingerprint((base / "sites" / "h2.pem").read_bytes())
    assert f'"h2" = "{digest}"' in out and len(digest) == 64
    assert f'"h2" = "{digest}"' in (base / "allowlist.toml").read_text()
    assert sorted(json.loads((base / "identities.json").read_text())) == ["h1", "h2", "h3"]
    server = x509.load_pem_x509_certificate((base / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)


def test_certs_init_refuses_to_replace_a_ca(tmp_path):
    init_certificates(tmp_path, ["a"])
    with pytest.raises(ConfigError, match="a CA already exists"):
        init_certificates(tmp_path, ["b"])


def test_certificate_validity_window(tmp_path):
    init_certificates(tmp_path, ["a"], days=10)
    pem = (tmp_path / "sites" / "a.pem").read_bytes()
    assert certificate_problem(pem) is None
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=11)
    assert certificate_problem(pem, now=later).startswith("certificate expired on")


def _network(**values):
    return config_from_dict({"network": values})


def test_network_config_validation():
    ok = _network(address="10.0.0.5:443", certs="certs", allowlist={"h1": "ab" * 32},
                  round_timeout=5.0)
    assert ok.network.allowlist == {"h1": "ab" * 32}
    with pytest.raises(ConfigError, match=r"\[network\] address must be a loopback address"):
        _network(address="0.0.0.0:50051", insecure=True)
    with pytest.raises(ConfigError, match="64-digit lowercase hex SHA-256"):
        _network(allowlist={"h1": "not-a-digest"})
    with pytest.raises(ConfigError, match="site names must be"):
        _network(allowlist={"bad name": "ab" * 32})
    with pytest.raises(ConfigError, match="address must be host:port"):
        _network(address="nowhere")
    with pytest.raises(ConfigError, match="max_message_bytes must be >= chunk_bytes"):
        _network(chunk_bytes=1 << 20, max_message_bytes=1000)
    assert _network(address="[::1]:7000", insecure=True).network.insecure


def test_certs_renew_reissues_a_site_certificate(tmp_path, capsys):
    import datetime as dt

    from securefl.cli import main
    from securefl.runtime.tls import certificate_problem, fingerprint, init_certificates

    folder = tmp_path / "certs"
    old = init_certificates(folder, ["alpha", "beta"], days=1)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)
    assert certificate_problem((folder / "sites" / "alpha.pem").read_bytes(), now=later)
    assert main(["certs", "renew", str(folder), "--sites", "alpha", "--days", "30"]) == 0
    pem = (folder / "sites" / "alpha.pem").read_bytes()
    assert certificate_problem(pem, now=later) is None
    out = capsys.readouterr().out
    assert f'"alpha" = "{fingerprint(pem)}"' in out and fingerprint(pem) != old["alpha"]
    assert (folder / "sites" / "beta.pem").read_bytes()  # untouched
    assert main(["certs", "renew", str(tmp_path / "nothing"), "--sites", "alpha"]) == 2


def test_deployment_paths_resolve_from_the_config_folder(tmp_path, monkeypatch):
    from securefl.runtime.deploy import load_deployment

    folder = tmp_path / "deploy"
    folder.mkdir()
    (folder / "fed.toml").write_text('[network]\ncerts = "certs"\nstate_dir = "state"\n'
                                     'client_state_dir = "/abs/site"\n')
    monkeypatch.chdir(tmp_path)
    config = load_deployment("deploy/fed.toml")
    assert config.network.certs == str(folder / "certs")
    assert config.network.state_dir == str(folder / "state")
    assert config.network.client_state_dir == "/abs/site"


def test_example_shard_names_exist_at_every_site():
    import tomllib
    from pathlib import Path

    from securefl.config import load_config
    from securefl.data import federate

    examples = Path(__file__).parents[2] / "examples" / "deployment"
    client = load_config(examples / "client.toml")
    server = tomllib.loads((examples / "server.toml").read_text())
    shards = federate(client.data, seed=client.run.seed).clients
    hospitals = sorted(server["network"]["allowlist"])
    assert client.network.data_shard in shards
    assert len(hospitals) == client.data.num_clients == len(shards)
    text = (examples / "client.toml").read_text()
    for index, hospital in enumerate(hospitals):
        assert f"{hospital} = client-{index}" in text and f"client-{index}" in shards


@pytest.mark.parametrize("bad", ["../x", "a b", "x/y", ".hidden", "é"])
def test_certs_init_refuses_a_site_name_that_is_not_one(tmp_path, capsys, bad):
    from securefl.cli import main

    assert main(["certs", "init", str(tmp_path / "c"), "--sites", f"ok,{bad}"]) == 2
    assert "site names are 1-64 letters" in capsys.readouterr().err
    assert not (tmp_path / "x.key").exists() and not (tmp_path / "c" / "ca.key").exists()


def test_the_printed_allowlist_is_valid_toml(tmp_path, capsys):
    import tomllib

    from securefl.cli import main

    assert main(["certs", "init", str(tmp_path / "c"), "--sites", "site.a,b-2,c_3"]) == 0
    printed = capsys.readouterr().out.split("\n", 1)[1]  # after the "wrote ..." line
    table = tomllib.loads(printed)["network"]["allowlist"]
    assert sorted(table) == ["b-2", "c_3", "site.a"]
    assert tomllib.loads((tmp_path / "c" / "allowlist.toml").read_text()) == {
        "network": {"allowlist": table}}
