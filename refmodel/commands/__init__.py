"""``refmodel`` subcommands: one module each, with ``register(subparsers)``.

Every command turns a user's mistake into a one-line message and exit code 2
(:class:`refmodel.errors.RefmodelError`), never a traceback.
"""
