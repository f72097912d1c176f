"""cljax.mtl (in progress)."""
