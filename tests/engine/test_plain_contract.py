import numpy as np

from securefl.engine.protection import Plain, Update, check_update
from tests.contracts.protection import ProtectionContract, converse


class TestPlainContract(ProtectionContract):
    tolerance = 1e-6

    def make(self, client_ids):
        plain = Plain()
        return plain, dict.fromkeys(client_ids, plain)


def test_nan_inf_and_wrong_shape_updates_are_rejected_round_goes_on():
    plain = Plain()
    ids = ["a", "b", "c", "d"]
    good = np.full(4, 0.5, np.float32)
    updates = {"a": Update(good, 1.0), "b": Update(np.array([1, np.nan, 0, 0], np.float32), 1.0),
               "c": Update(np.array([np.inf, 0, 0, 0], np.float32), 1.0),
               "d": Update(np.ones(5, np.float32), 1.0)}
    rows = converse(plain, dict.fromkeys(ids, plain), updates, dimension=4)
    assert rows.client_ids == ("a",)
    assert set(rows.rejected) == {"b", "c", "d"}
    assert "NaN" in rows.rejected["b"] and "shape" in rows.rejected["d"]
    np.testing.assert_array_equal(rows.updates[0], good)


def test_check_update_reasons():
    assert check_update(np.zeros(3, np.float32), 3) is None
    assert "float" in check_update(np.zeros(3, np.int32), 3)
    assert "shape" in check_update(np.zeros((3, 1), np.float32), 3)
