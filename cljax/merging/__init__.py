"""cljax.merging (in progress)."""
