"""One module per `sasa-bench` subcommand; each defines ``register(subparsers)``."""
