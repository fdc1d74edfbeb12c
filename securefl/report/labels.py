"""Human labels for the configuration and summary keys a report shows, and which privacy
settings belong to which mode (the report shows only those of the mode the run used)."""

from __future__ import annotations

__all__ = ["PRIVACY_SETTINGS", "label"]

_LABELS = {
    # summary.json
    "name": "Run name", "rounds": "Rounds", "final_accuracy": "Final test accuracy",
    "final_loss": "Final test loss", "best_accuracy": "Best test accuracy",
    "protection": "Protection", "aggregation": "Aggregation rule", "privacy": "Privacy mode",
    "seed": "Seed", "aborted_rounds": "Aborted rounds", "setup_seconds": "Setup time (s)",
    "total_seconds": "Total time (s)", "resumed_from": "Resumed after round",
    "model_sha256": "Final model SHA-256", "epsilon_spent": "ε spent per site",
    # [protection.secagg]
    "secagg.clip": "Coordinate clip range (±)", "secagg.max_weight": "Largest client weight",
    "secagg.bits": "Quantization bits", "secagg.neighbours": "Neighbours per site (k)",
    "secagg.threshold": "Share threshold (fraction of k)",
    "secagg.min_neighbours": "Fewest neighbours a site accepts",
    # [protection.he]
    "he.poly_modulus_degree": "CKKS ring degree", "he.coeff_modulus_bits": "Modulus chain (bits)",
    "he.scale_bits": "Scale (bits)", "he.min_contributors": "Fewest uploads a site decrypts",
    "he.layers": "Encrypted layers (empty: all)", "he.resum": "Sites re-add the uploads",
    # [privacy]
    "mode": "Privacy mode", "target_epsilon": "Target ε of the run", "delta": "δ",
    "noise_multiplier": "Noise multiplier", "max_grad_norm": "Per-example clip norm",
    "grad_sample_mode": "Opacus per-sample gradient mode",
    "secure_mode": "CSPRNG noise and sampling", "fix_model": "Replace layers DP cannot train",
    "budget": "ε budget per client", "accountant": "Accountant",
    "clip_norm": "Per-client update clip norm", "adaptive_clipping": "Adaptive clipping",
    "target_quantile": "Adaptive clipping: target quantile",
    "clip_learning_rate": "Adaptive clipping: step size",
    "clipped_count_stddev": "Adaptive clipping: count noise std",
    "sampling": "Participation accounted as",
    "participation_quantile": "Calibrated for this quantile of participations",
    # [network]
    "network.insecure": "TLS disabled (insecure)", "network.certs": "Certificate folder",
    "network.allowlist": "Sites on the allowlist", "network.audit": "Signed audit log",
}

#: the [privacy] fields each mode uses (shown in the report); the rest do not apply
PRIVACY_SETTINGS = {
    "none": ("mode",),
    "dp_sgd": ("mode", "target_epsilon", "noise_multiplier", "max_grad_norm", "delta",
               "budget", "accountant", "secure_mode", "grad_sample_mode", "fix_model"),
    "dp_fedavg": ("mode", "target_epsilon", "noise_multiplier", "clip_norm", "delta", "budget",
                  "accountant", "secure_mode", "sampling", "participation_quantile",
                  "adaptive_clipping",
                  "target_quantile", "clip_learning_rate", "clipped_count_stddev"),
    "distributed": ("mode", "target_epsilon", "clip_norm", "delta", "budget", "accountant",
                    "secure_mode", "participation_quantile", "bits", "expected_cohort",
                    "min_cohort", "colluding_sites"),
}


def label(key: str) -> str:
    """The human label of ``key``; an unknown key reads as words (``num_byzantine`` ->
    ``Num byzantine``)."""
    if key in _LABELS:
        return _LABELS[key]
    words = key.rsplit(".", 1)[-1].replace("_", " ")
    return words[:1].upper() + words[1:]
