"""CLI verbs: one module per group of verbs, each with ``register(subparsers)`` (see :mod:`bittern.cli`)."""
