"""Data layer: loaders, validation, sessions, vocabularies, splits, caching, synthetic data."""
