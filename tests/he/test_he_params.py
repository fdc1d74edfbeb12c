"""CKKS parameters: the HE-Standard 128-bit table, capacity and the error bound."""

import dataclasses
import math

import pytest

from securefl.config import config_from_dict
from securefl.config.he import HEConfig
from securefl.errors import ConfigError
from securefl.he import MAX_COEFF_MODULUS_BITS, CKKSKeys, CKKSParameters


def test_security_table_is_the_he_standard_128_bit_column():
    assert MAX_COEFF_MODULUS_BITS == {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438,
                                      32768: 881}


@pytest.mark.parametrize("degree,bits", [(8192, (60, 60, 60, 39)), (4096, (60, 50)),
                                         (2048, (30, 25)), (16384, (60,) * 7 + (40,))])
def test_modulus_over_the_128_bit_limit_is_refused(degree, bits):
    assert sum(bits) > MAX_COEFF_MODULUS_BITS[degree]
    with pytest.raises(ValueError, match="128-bit security limit"):
        CKKSParameters(degree, bits, 24)
    with pytest.raises(ValueError, match="128-bit security limit"):
        CKKSKeys.generate(poly_modulus_degree=degree, coeff_modulus_bits=bits, scale_bits=24)


def test_limit_itself_is_accepted_and_seal_agrees():
    keys = CKKSKeys.generate(poly_modulus_degree=4096, coeff_modulus_bits=(60, 49),
                             scale_bits=40)  # exactly 109 bits
    assert keys.parameters.reals_per_ciphertext == 4096


@pytest.mark.parametrize("degree,bits,scale,field", [
    (3000, (55, 40), 36, "poly_modulus_degree"),
    (8192, (55,), 36, "coeff_modulus_bits"),
    (8192, (61, 40), 36, "coeff_modulus_bits"),
    (8192, (55, 40), 43, "scale_bits"),
    (8192, (55, 40), 19, "scale_bits"),
])
def test_unusable_parameters_name_the_field(degree, bits, scale, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        CKKSParameters(degree, bits, scale)


def test_config_rejects_insecure_choice_with_file_and_field():
    with pytest.raises(ConfigError, match=r"\[protection.he\] coeff_modulus_bits total 240"):
        config_from_dict({"protection": {"kind": "he", "he": {
            "coeff_modulus_bits": [60, 60, 60, 60]}}}, source="x.toml")
    with pytest.raises(ConfigError, match="min_contributors must be >= 1"):
        config_from_dict({"protection": {"he": {"min_contributors": 0}}})
    with pytest.raises(ConfigError, match="decryptors is not a known key"):  # sites decrypt
        config_from_dict({"protection": {"he": {"decryptors": 1}}})
    config = config_from_dict({"protection": {"kind": "he", "he": {"scale_bits": 30}}})
    assert config.protection.he == HEConfig(scale_bits=30)


def test_default_capacity_and_error_bound_numbers():
    p = CKKSParameters()
    assert p.reals_per_ciphertext == 8192 and p.slots == 4096
    # Q/2 > 2^53, Δ = 2^36: capacity = 2^17 (1 - 2^-8) / sqrt(2)
    assert p.capacity == pytest.approx(2 ** 17 * (1 - 2 ** -8) / math.sqrt(2))
    assert p.error_bound(1) == pytest.approx(8.54e-8, rel=0.01)
    assert p.error_bound(10) < 1e-6  # the promised bound for a 10-client sum
    assert 9 < p.error_bound(100) / p.error_bound(10) < 10  # worst-case round-off grows ~ n
    # the FedAvg mean's error, sqrt(2) error_bound(n) / n (1.21e-7 at n = 1) with the weight unit
    assert all(math.sqrt(2) * p.error_bound(n) / n <= 1.25e-7 for n in (1, 10, 100, 10_000))
    with pytest.raises(ValueError):
        p.error_bound(0)


@pytest.mark.parametrize("table,message", [
    ({"server": {"optimizer": "fedadam"}},
     r"\[server\] optimizer 'fedadam' needs the plaintext model, which HE keeps encrypted"),
    ({"server": {"optimizer": "fedavgm"}}, r"\[server\] optimizer 'fedavgm' needs the plain"),
    ({"privacy": {"mode": "dp_fedavg", "target_epsilon": 1.0}},
     r"\[privacy\] mode \"dp_fedavg\" adds its noise at the server"),
])
def test_what_needs_the_plaintext_model_is_refused_with_he(table, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"protection": {"kind": "he"}, **table})


def test_a_layer_pattern_that_matches_nothing_is_one_config_line_in_simulation(tmp_path):
    import subprocess
    import sys

    from securefl.config import load_config

    text = open("examples/he.toml").read().replace('# layers = ["1.*"]', 'layers = ["fc.0.*"]')
    path = tmp_path / "he.toml"
    path.write_text(text)
    assert load_config(path).protection.he.layers == ("fc.0.*",)
    done = subprocess.run([sys.executable, "-m", "securefl.cli", "run", str(path),
                           "--rounds", "1", "--out", str(tmp_path / "out"), "--quiet"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"securefl: error: {path}: [protection.he] layers: layer pattern 'fc.0.*' matches no "
        "parameter (parameters: 1.weight, 1.bias, 3.weight, 3.bias)"]


def test_the_example_layer_pattern_matches_real_parameters():
    from securefl.config import load_config
    from securefl.simulation import build_simulation

    text = open("examples/he.toml").read()
    assert '# layers = ["1.*"]' in text
    config = load_config("examples/he.toml")
    config = config.replace(protection__he=dataclasses.replace(config.protection.he,
                                                               layers=("1.*",)))
    sim = build_simulation(config)
    assert sim.server.protection.selection.encrypted.size == 64 * 64 + 64


def test_certs_init_he_only_rotates_only_the_ckks_keys(tmp_path):
    from securefl.cli import main

    certs = tmp_path / "certs"
    assert main(["certs", "init", str(certs), "--sites", "a,b", "--he", "examples/he.toml"]) == 0
    before = {p.name: p.read_bytes() for p in certs.rglob("*") if p.is_file()}
    first = CKKSKeys.from_bytes((certs / "he" / "public.ctx").read_bytes()).key_id
    assert main(["certs", "init", str(certs), "--he", "examples/he.toml", "--he-only"]) == 0
    after = {p.name: p.read_bytes() for p in certs.rglob("*") if p.is_file()}
    assert CKKSKeys.from_bytes((certs / "he" / "public.ctx").read_bytes()).key_id != first
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"public.ctx", "secret.ctx"}
    assert main(["certs", "init", str(certs), "--he-only"]) == 2
