"""The purchase flow: the one place a challenge becomes a payment, whatever carried it.

`flow.py` runs the steps in order; `order.py` holds what travels through them; `schemes.py` is the
interface per payment kind; `http.py` is the HTTP 402 carrier (an MCP tool result is another).
"""
