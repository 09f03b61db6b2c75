"""Benchmarks that print figures (bench/README.md); run from a checkout: python3 bench/<name>.py."""
