"""cljax.models (in progress)."""
