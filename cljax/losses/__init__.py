"""cljax.losses (in progress)."""
