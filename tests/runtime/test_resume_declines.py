"""A resumed server remembers which sites declined for their budget: a decline is permanent
(a budget only shrinks), so the resumed run starts no round those sites would refuse."""

from __future__ import annotations

import logging

import pytest

from securefl.privacy import distributed_settings
from securefl.runtime.store import ServerStore
from tests.privacy.test_skellam import independent_epsilon
from tests.runtime.test_distributed_network import (
    DELTA,
    distributed_config,
    server_manifest_size,
)
from tests.runtime.test_federation import SITES, deployment, run_networked  # noqa: F401


def test_a_resumed_server_starts_no_round_the_sites_declined(deployment, tmp_path,  # noqa: F811
                                                             caplog):
    config = distributed_config(deployment, tmp_path, rounds=2)
    plan = distributed_settings(config, len(SITES)).plan(server_manifest_size(config))
    one, two = (independent_epsilon(r, variance=plan.variance, l1=plan.l1, l2=plan.l2,
                                    delta=DELTA) for r in (1, 2))
    config = config.replace(privacy__budget=(one + two) / 2)  # one round each
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
