"""Benchmarks that print figures (bench/README.md): python3 bench/<name>.py from a checkout."""
