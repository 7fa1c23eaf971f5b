"""Reporting trained runs: significance across users and seeds, tables, plots, comparisons."""
