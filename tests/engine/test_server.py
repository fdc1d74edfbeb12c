import numpy as np
import pytest

from securefl.aggregation import FedAvg
from securefl.engine.client import Client
from securefl.engine.optim import FedAdam, FedAvgM, ServerOptimizer
from securefl.engine.protection import Plain, Update
from securefl.engine.server import Sampler, Server
from securefl.engine.simulation import InProcessTransport
from securefl.errors import BudgetExceeded


class FixedTrainer:
    """Returns a fixed delta, or raises what it is told to."""

    def __init__(self, delta, weight=1.0, error=None):
        self.delta, self.weight, self.error = np.asarray(delta, np.float32), weight, error

    def fit(self, parameters, *, round):
        if self.error:
            raise self.error
        return Update(self.delta, self.weight), {"train_loss": 1.0}

    def evaluate(self, parameters):
        return 10, float(parameters.sum()), 0.5


def make_server(trainers, *, optimizer=None, evaluate=False, **kw):
    plain = Plain()
    clients = {c: Client(c, t, plain, evaluate=evaluate) for c, t in trainers.items()}
    return Server(InProcessTransport(clients), plain, FedAvg(), optimizer or ServerOptimizer(),
                  parameters=np.zeros(3, np.float32), seed=0, **kw)


def test_weighted_fedavg_step():
    server = make_server({"a": FixedTrainer([1, 0, 0], 1.0), "b": FixedTrainer([0, 4, 0], 3.0)})
    record = server.run_round(1)
    np.testing.assert_allclose(server.parameters, [0.25, 3.0, 0.0])
    assert record.clients == ["a", "b"] and record.train_loss == 1.0


def test_bad_update_dropped_round_goes_on():
    server = make_server({"a": FixedTrainer([1, 1, 1]), "b": FixedTrainer([np.nan, 0, 0]),
                          "c": FixedTrainer([1, 2])})
    record = server.run_round(1)
    assert record.clients == ["a"] and set(record.rejected) == {"b", "c"}
    np.testing.assert_allclose(server.parameters, [1, 1, 1])


def test_budget_exceeded_client_declines():
    server = make_server({"a": FixedTrainer([2, 2, 2]),
                          "b": FixedTrainer([9, 9, 9], error=BudgetExceeded("eps 9 > 8"))})
    record = server.run_round(1)
    assert record.declined == {"b": "eps 9 > 8"} and record.clients == ["a"]
    np.testing.assert_allclose(server.parameters, [2, 2, 2])


def test_crashing_client_is_dropped():
    server = make_server({"a": FixedTrainer([1, 1, 1]),
                          "b": FixedTrainer([0, 0, 0], error=RuntimeError("disk full"))})
    record = server.run_round(1)
    assert "disk full" in record.dropped["b"] and record.clients == ["a"]


def test_min_clients_aborts_round_without_update():
    server = make_server({"a": FixedTrainer([1, 1, 1])}, min_clients=2)
    record = server.run_round(1)
    assert record.aborted and not record.clients
    np.testing.assert_array_equal(server.parameters, 0)


def test_federated_evaluation_is_weighted_and_scores_the_model_trained_from():
    server = make_server({"a": FixedTrainer([1, 1, 1]), "b": FixedTrainer([3, 3, 3])},
                         federated_evaluation=True, evaluate=True)
    first = server.run_round(1)  # the sites trained from zeros: loss = sum(0) = 0
    second = server.run_round(2)  # ... then from the round-1 model (2, 2, 2)
    assert first.federated_loss == pytest.approx(0.0) and first.accuracy == 0.5
    assert second.federated_loss == pytest.approx(6.0)


def test_sites_that_did_not_enable_evaluation_release_nothing():
    server = make_server({"a": FixedTrainer([1, 1, 1])}, federated_evaluation=True)
    record = server.run_round(1)
    assert record.federated_loss is None and record.accuracy is None


def test_sampler_by_count_and_fraction_is_seeded():
    ids = [f"c{i}" for i in range(10)]
    a = Sampler(count=3)(ids, np.random.default_rng([1, 2]))
    assert a == Sampler(count=3)(ids, np.random.default_rng([1, 2])) and len(a) == 3
    assert len(Sampler(fraction=0.25)(ids, np.random.default_rng(0))) == 3
    assert Sampler()(ids, np.random.default_rng(0)) == ids


def test_server_optimizers():
    p, d = np.zeros(2, np.float32), np.array([1.0, -2.0], np.float32)
    np.testing.assert_allclose(ServerOptimizer(lr=0.5).step(p, d), [0.5, -1.0])
    m = FedAvgM(lr=1.0, momentum=0.5)
    p1 = m.step(p, d)
    np.testing.assert_allclose(m.step(p1, d), p1 + 1.5 * d)
    adam = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    step = adam.step(p, d)
    # m = 0.1 d, v = 0.01 d^2 -> m / (sqrt(v) + tau) = 0.1 d / (0.1 |d| + 1e-3)
    np.testing.assert_allclose(step, 0.1 * 0.1 * d / (0.1 * np.abs(d) + 1e-3), rtol=1e-5)
    with pytest.raises(ValueError):
        ServerOptimizer(lr=0)
