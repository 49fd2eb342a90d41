"""p2pdiloco: DiLoCo training of language models over a hivemind swarm of volunteers.

Importing the package is cheap (no torch); the heavy modules are imported by the commands.
"""

__version__ = "0.1.0"
