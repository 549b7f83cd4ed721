"""Logs: request-scoped context, plain or JSON formatting, and the access log."""
