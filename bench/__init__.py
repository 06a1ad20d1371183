"""Benchmarks (not tests): run from the repository root as modules, e.g. ``python -m bench.attnres_op``.

A package so that the tile sweep reuses the op benchmark's presets and the tests import both by name;
results go to bench/results/.
"""
