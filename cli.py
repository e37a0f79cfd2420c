"""``python cli.py ...``: a thin shim over the Typer app in :mod:`topocam.cli` (the
``topocam`` command), so a checkout runs without installing."""

from topocam.cli import main

if __name__ == "__main__":
    main()
