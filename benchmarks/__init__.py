"""Benchmarks; run them as modules from the repository root (`.venv/bin/python -m benchmarks.speed`).

This file must exist: opacus installs its own top-level `benchmarks` package, which would otherwise
shadow this folder.
"""
