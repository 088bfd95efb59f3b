"""Build DPO preference data from a model's own samples: sample, score, pair, write."""
