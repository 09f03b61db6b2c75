"""Builders and servers the tests share; not test modules (pytest collects nothing here)."""
