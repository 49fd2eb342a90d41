"""``python -m p2pdiloco``: the same command line as ``p2pdiloco`` (the tests and ``simulate`` start peers this way)."""

from p2pdiloco.cli import main

main()
