"""Paying x402 challenges: parse the 402, decide within policy, sign, and record in the ledger.

Modules (import what you need; nothing heavy is imported here):

- ``challenge``  parse a 402 into a normalized ``Challenge`` (pure)
- ``policy``     ``PolicyConfig`` and ``choose_requirement`` -> ``Selection | Refusal`` (pure)
- ``signer``     ``build_payment_header`` (EIP-3009 / Permit2 / upto via the x402 SDK)
- ``wallet``     key file / keystore / env loading, ``create_key_file``, ``token_balance``
- ``settlement`` lenient parsing of ``PAYMENT-RESPONSE`` / ``X-PAYMENT-RESPONSE`` (pure)
- ``payer``      ``Payer``: the one place where a 402 becomes a payment (does the I/O)
- ``stage``      engine glue: notice a 402, ask the Payer, replay once with the payment header
- ``reconcile``  resolve ``unknown`` ledger rows from the chain (``decide`` is pure; ``Reconciler`` reads)

See docs/payments.md for the decisions behind them.
"""
