"""Tests of cljax.losses (a package: test basenames repeat elsewhere, e.g. test_zscl)."""
