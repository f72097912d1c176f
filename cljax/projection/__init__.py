"""cljax.projection (in progress)."""
