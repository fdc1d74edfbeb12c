from securefl.config.secagg import SecAggConfig
from securefl.secagg import build_simulation
from tests.contracts.protection import ProtectionContract


class TestSecAggContract(ProtectionContract):
    num_clients = 6
    config = SecAggConfig(clip=1.0, max_weight=100.0)
    # per unit of total weight: stochastic rounding error of at most one quantization step
    # per client, i.e. n * 2c / levels, with levels in the millions for 6 clients
    tolerance = 1e-4

    def make(self, client_ids):
        return build_simulation(self.config, client_ids)
