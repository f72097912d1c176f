"""cljax.averaging (in progress)."""
