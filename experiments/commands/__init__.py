"""The experiment subcommands of ``tripletlab``: ``losses``, ``train`` and ``evaluate``; each has
``configure(parser)`` and ``main(args) -> int``."""
