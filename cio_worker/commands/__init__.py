"""Subcommands of ``cio-worker`` beyond preflight/frames, one module per group."""
