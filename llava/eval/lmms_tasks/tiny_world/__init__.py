"""lmms-eval tasks over the tiny world's test split: `tiny_world` (answers) and `tiny_world_mc` (likelihoods)."""
