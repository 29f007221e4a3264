"""Benchmarks (SPEC §9): scripts that print ratios measured in one run on one machine.

Run as ``python -m benchmarks.NAME`` from the repository root; each prints the machine, the torch
version and the thread count with its table, and ``--json FILE`` saves the raw numbers.
"""
