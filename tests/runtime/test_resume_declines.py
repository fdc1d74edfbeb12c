"""A resumed server remembers which sites declined for their budget: a decline is permanent
(a budget only shrinks), so the resumed run starts no round those sites would refuse."""

from __future__ import annotations

import logging

import pytest

from securefl.runtime.store import ServerStore
from tests.runtime.test_distributed_network import one_round_budget
from tests.runtime.test_federation import SITES, deployment, run_networked  # noqa: F401


def test_a_resumed_server_starts_no_round_the_sites_declined(deployment, tmp_path,  # noqa: F811
                                                             caplog):
    config, one = one_round_budget(deployment, tmp_path, rounds=2)
    first, sites = run_networked(config, site_dirs=tmp_path / "sites")
    assert set(sites.codes.values()) == {0}
    trained, refused = first.history.rounds
    assert sorted(trained.clients) == SITES and sorted(refused.declined) == SITES
    caplog.clear()
    caplog.set_level(logging.INFO, logger="securefl")
    longer = config.replace(run__rounds=4)  # rounds are not part of the run's fingerprint
    resumed, sites = run_networked(longer, resume=True, site_dirs=tmp_path / "sites")
    assert set(sites.codes.values()) == {0}
    assert resumed.resumed_from == 2
    assert resumed.history.rounds == []  # no FitIns went out: nothing to decline again
    assert resumed.history.stopped is not None
    assert resumed.history.stopped.startswith("stopped before round 3: 0 of 5 clients have "
                                              "privacy budget left")
    assert "declines round 3" not in caplog.text
    store = ServerStore(resumed.state_dir)
    assert [r["round"] for r in store.rounds()] == [1, 2]
    assert store.spent() == {site: pytest.approx(one, rel=1e-9) for site in SITES}
    store.close()
