"""Measuring models: exact vs polynomial fidelity (benchmarks and probes to come)."""
