"""Bridges to other frameworks (the package itself never imports them)."""
