"""``python -m p2pdiloco``: the same command line as ``p2pdiloco`` (the tests and ``simulate`` start peers this way)."""

from p2pdiloco.cli import main

if __name__ == "__main__":  # a spawned local worker (peer.devices) re-imports this module: it must not run the CLI
    main()
