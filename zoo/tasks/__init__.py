"""Downstream tasks: train / evaluate loops and metrics. A module here that defines
``add_cli(subparsers)`` gets a ``zoo`` subcommand."""
