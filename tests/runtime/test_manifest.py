"""The hello check: site and server agree on the model layout and the protection and privacy
settings before round 1, each checking the other (the server is an adversary too)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from torch import nn

import securefl.runtime.transport as transport_module
from securefl.config import config_from_dict
from securefl.engine.messages import FitIns, PlainUpdate, encode
from securefl.engine.session import RUN_ID_BYTES
from securefl.runtime.manifest import (
    MAX_MANIFEST_BYTES,
    MAX_PARAMETERS,
    Manifest,
    ManifestError,
    difference,
    manifest_of,
    read_manifest,
)
from tests.runtime.conftest import federation, network
from tests.runtime.test_federation import deployment as deployment  # a fixture

DP = {"privacy": {"mode": "dp_sgd", "target_epsilon": 8.0, "delta": 1e-3},
      "protection": {"kind": "secagg", "secagg": {"clip": 1.0, "max_weight": 1000.0}}}


def model(width: int = 32, inputs: int = 20) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, 2))


def manifest(width: int = 32, inputs: int = 20, **sections) -> Manifest:
    table = {**DP, **sections}
    return manifest_of(config_from_dict(table), model(width, inputs))


class Recorder:
    """A site's engine handler that records every request it is asked to answer."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.requests: list = []

    def handle(self, request, *, round):
        self.requests.append(request)
        return PlainUpdate(update=np.zeros(3, np.float32), weight=1.0)


def fit() -> FitIns:
    return FitIns(run=b"\x01" * RUN_ID_BYTES, round=1, parameters=np.zeros(3, np.float32),
                  config={}, protection=None)


# ----------------------------------------------------------------------------- the comparison
def test_equal_manifests_agree_and_integral_floats_compare_equal():
    assert difference(manifest(), manifest(), here="here", there="there") is None
    as_int = manifest(privacy={**DP["privacy"], "target_epsilon": 8})
    assert as_int.settings["[privacy] target_epsilon"] == "8"
    assert difference(manifest(), as_int, here="a", there="b") is None


def test_difference_names_the_parameter_and_every_setting():
    diff = difference(manifest(), manifest(width=64, privacy={**DP["privacy"],
                                                            "target_epsilon": 4.0}),
                      here="at alpha", there="at the server")
    assert diff == ("model parameter '0.weight' has shape [32, 20] at alpha, [64, 20] at the "
                    "server; [privacy] target_epsilon is 8 at alpha, 4 at the server")
    plain = manifest(protection={"kind": "plain"})
    diff = difference(manifest(), plain, here="at alpha", there="at the server")
    assert diff.startswith("[protection] kind is \"secagg\" at alpha, \"plain\" at the server")
    assert "[protection.secagg] clip is 1 at alpha, unset at the server" in diff
    deeper = manifest_of(config_from_dict(DP), nn.Sequential(nn.Linear(20, 32), nn.ReLU(),
                                                            nn.Linear(32, 2), nn.Linear(2, 2)))
    assert difference(manifest(), deeper, here="at a", there="at b") == (
        "the model has 4 parameter tensors at a, 6 at b")


def test_parties_of_two_secagg_wire_formats_refuse_each_other(monkeypatch):
    import securefl.secagg.prg as prg

    ours = manifest()
    monkeypatch.setattr(prg, "WIRE_VERSION", prg.WIRE_VERSION - 1)
    older = manifest()
    assert difference(ours, older, here="at alpha", there="at the server") == (
        f"securefl secagg wire version is {prg.WIRE_VERSION + 1} at alpha, "
        f"{prg.WIRE_VERSION} at the server")


def test_site_local_choices_are_not_compared():
    mine = manifest(privacy={**DP["privacy"], "budget": 2.0, "secure_mode": True})
    theirs = manifest(protection={"kind": "secagg", "secagg": {
        "clip": 1.0, "max_weight": 1000.0, "min_neighbours": 3, "threshold": 0.7}})
    assert difference(mine, theirs, here="a", there="b") is None


def test_received_manifests_are_bounded_before_use():
    good = encode(manifest())
    assert read_manifest(good, sender="beta").settings == manifest().settings
    with pytest.raises(ManifestError, match=r"^beta sent a manifest of \d+ bytes"):
        read_manifest(good + b"\0" * MAX_MANIFEST_BYTES, sender="beta")
    with pytest.raises(ManifestError, match=r"^beta sent no readable manifest"):
        read_manifest(b"\x80\x04\x95pickle", sender="beta")
    with pytest.raises(ManifestError, match=r"no readable manifest.*expected Manifest"):
        read_manifest(encode(fit()), sender="beta")
    many = Manifest(layout=[("w", (1,), "torch.float32")] * (MAX_PARAMETERS + 1), settings={})
    with pytest.raises(ManifestError, match=f"lists {MAX_PARAMETERS + 1} parameters"):
        read_manifest(encode(many), sender="beta")
    for row in [("", (1,), "torch.float32"), ("w", (1,) * 9, "torch.float32"),
                ("w", (-1,), "torch.float32"), ("w\n", (1,), "torch.float32")]:
        with pytest.raises(ManifestError, match="malformed parameter"):
            read_manifest(encode(Manifest(layout=[row], settings={})), sender="beta")
    with pytest.raises(ManifestError, match="malformed or too many settings"):
        read_manifest(encode(Manifest(layout=[], settings={"k": "v" * 300})), sender="beta")


# ----------------------------------------------------------------------------- over the wire
def test_the_server_refuses_a_site_with_another_model_naming_it(certs, caplog):
    caplog.set_level(logging.INFO, logger="securefl")
    with federation(network(certs), manifest=manifest()) as fed:
        handler = Recorder("alpha")
        fed.join(handler, wait=False, manifest=manifest(width=64))
        assert fed.wait_exit("alpha#0") == 1  # refused for good: no retry loop
        assert fed.transport.connected() == []
    assert handler.requests == []
    text = ("alpha and the server disagree: model parameter '0.weight' has shape [32, 20] at "
            "the server, [64, 20] at alpha")
    assert any(r.name == "securefl.runtime.transport" and "refused connection from alpha"
               in r.getMessage() and text in r.getMessage() for r in caplog.records)
    assert any(r.name == "securefl.runtime.client" and "FAILED_PRECONDITION" in r.getMessage()
               and text in r.getMessage() for r in caplog.records)


def test_the_server_refuses_other_privacy_settings_and_a_hello_without_manifest(certs, caplog):
    caplog.set_level(logging.WARNING, logger="securefl")
    with federation(network(certs), manifest=manifest()) as fed:
        fed.join(Recorder("alpha"), wait=False,
                 manifest=manifest(privacy={**DP["privacy"], "delta": 1e-5}))
        fed.join(Recorder("beta"), wait=False)  # no manifest at all: an empty hello
        assert fed.wait_exit("alpha#0") == 1 and fed.wait_exit("beta#1") == 1
    refusals = [r.getMessage() for r in caplog.records if "refused connection" in r.getMessage()]
    assert any("alpha" in m and "[privacy] delta is 0.001 at the server, 1e-05 at alpha" in m
               for m in refusals)
    assert any("from beta: beta sent no readable manifest" in m for m in refusals)


def test_agreeing_parties_train_after_the_announcement(certs):
    with federation(network(certs), manifest=manifest()) as fed:
        handler = Recorder("alpha")
        fed.join(handler, manifest=manifest())
        result = fed.transport.exchange({"alpha": fit()}, round=1, timeout=10)
    assert list(result.replies) == ["alpha"] and len(handler.requests) == 1


def test_a_site_refuses_a_server_that_announces_nothing(certs, caplog):
    caplog.set_level(logging.INFO, logger="securefl")
    with federation(network(certs)) as fed:  # a server that skips the announcement
        handler = Recorder("alpha")
        fed.join(handler, manifest=manifest())  # admitted: this server checks nothing
        result = fed.transport.exchange({"alpha": fit()}, round=1, timeout=5)
        assert fed.wait_exit("alpha#0") == 1
    assert "alpha" in result.dropped and handler.requests == []
    assert any(r.name == "securefl.runtime.client" and "not joining the server at" in
               r.getMessage() and "sent a REQUEST frame before announcing" in r.getMessage()
               for r in caplog.records)


def lying(monkeypatch) -> None:
    """Make the server admit any site, whatever it announces itself."""
    monkeypatch.setattr(transport_module, "hello_refusal", lambda *_a, **_k: None)


def test_a_site_refuses_a_server_that_announces_another_model(certs, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="securefl")
    lying(monkeypatch)
    with federation(network(certs), manifest=manifest(inputs=30)) as fed:
        handler = Recorder("alpha")
        fed.join(handler, wait=False, manifest=manifest())
        assert fed.wait_exit("alpha#0") == 1
        result = fed.transport.exchange({"alpha": fit()}, round=1, timeout=2)
    assert "alpha" in result.dropped and handler.requests == []
    line = next(r.getMessage() for r in caplog.records if "not joining" in r.getMessage())
    assert line.startswith("site alpha: not joining the server at 127.0.0.1:")
    assert line.endswith("the server announces another federation: model parameter "
                         "'0.weight' has shape [32, 20] at alpha, [32, 30] at the server")


def test_a_site_refuses_an_unreadable_announcement(certs, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="securefl")
    monkeypatch.setattr(transport_module, "announce", lambda _m: b"\x80\x04\x95" * 100)
    lying(monkeypatch)
    with federation(network(certs), manifest=manifest()) as fed:
        handler = Recorder("alpha")
        fed.join(handler, wait=False, manifest=manifest())
        assert fed.wait_exit("alpha#0") == 1
    assert handler.requests == []
    assert any("the server sent no readable manifest (not a securefl message)" in r.getMessage()
               for r in caplog.records)


# ----------------------------------------------------------------------------- end to end
def test_serve_refuses_a_misconfigured_site_and_trains_with_the_others(deployment, tmp_path,
                                                                       caplog):
    """``securefl server``/``client`` code: a site whose config names another model is
    refused at hello, before round 1, and never trains; the others federate."""
    import threading

    from securefl.runtime.client import build_site_client
    from securefl.runtime.server import serve
    from tests.runtime.test_federation import SITES, make_config

    caplog.set_level(logging.INFO, logger="securefl")
    config = make_config(deployment, tmp_path, rounds=1, min_connected=4)
    odd = "client-4"
    codes: dict[str, int] = {}
    threads = []
    for site in SITES:
        own = config.replace(network__client_state_dir=str(tmp_path / "sites" / site))
        if site == odd:
            own = own.replace(model__name="mlp")
        client = build_site_client(own, site)
        thread = threading.Thread(target=lambda s=site, c=client: codes.__setitem__(s, c.run()),
                                  daemon=True)
        thread.start()
        threads.append(thread)
    try:
        result = serve(config)
    finally:
        for thread in threads:
            thread.join(30)
    assert codes == {**{s: 0 for s in SITES if s != odd}, odd: 1}
    (record,) = result.history.rounds
    assert sorted(record.clients) == [s for s in SITES if s != odd]
    assert record.dropped[odd] == "not connected"
    refusal = next(r.getMessage() for r in caplog.records
                   if r.getMessage().startswith(f"refused connection from {odd}"))
    assert (f"{odd} and the server disagree: model parameter '1.weight' has shape [10, 64] "
            f"at the server, [64, 64] at {odd}") in refusal


def test_rounds_are_shared_only_when_they_calibrate_the_noise():
    calibrated = manifest(run={"rounds": 5})
    assert calibrated.settings["[run] rounds"] == "5"
    assert "rounds" in difference(calibrated, manifest(run={"rounds": 6}), here="a", there="b")
    fixed = {"privacy": {"mode": "dp_sgd", "noise_multiplier": 1.1, "delta": 1e-3}}
    assert difference(manifest(run={"rounds": 5}, **fixed), manifest(run={"rounds": 6}, **fixed),
                      here="a", there="b") is None
    assert "[run] rounds" not in manifest(privacy={"mode": "none"}).settings
