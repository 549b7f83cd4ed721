"""x402 `batch-settlement` channels held as sessions (issue 18): deposit once, a voucher per request,
refund at the end. `holder.py` is the one place a channel is opened, used and ended; `book.py` is its
persistent state (the SDK's client storage interface on a table of ours)."""
