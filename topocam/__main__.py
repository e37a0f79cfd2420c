"""``python -m topocam``: the same CLI as the ``topocam`` command."""

from topocam.cli import main

if __name__ == "__main__":
    main()
