"""``python -m cio_worker``: the command line."""

from cio_worker.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
