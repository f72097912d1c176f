"""cljax.continual (in progress)."""
