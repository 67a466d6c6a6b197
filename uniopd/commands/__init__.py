"""One module per `uniopd` command; `uniopd.cli` only parses and dispatches."""
