"""Asset health: a PCA model per device over its sensors taken together (T² and Q)."""
