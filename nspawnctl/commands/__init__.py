"""One module per verb (or per family of small verbs). Each has `register(subparsers)`,
which adds its parser and sets `handler`: `(args, paths) -> exit code`."""
