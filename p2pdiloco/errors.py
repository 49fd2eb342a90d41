"""Typed errors. The CLI turns each into one line on stderr and a non-zero exit code."""


class P2PDilocoError(Exception):
    """Base class: an error the user can act on. ``str(err)`` names the problem and the fix."""

    exit_code = 1


class ConfigError(P2PDilocoError):
    """A malformed, unknown or inconsistent config value."""

    exit_code = 2


class ConfigMismatch(P2PDilocoError):
    """This peer's run config differs from the one the swarm published."""

    exit_code = 3


class SwarmError(P2PDilocoError):
    """The DHT could not start or could not reach the given peers."""

    exit_code = 4


class DataError(P2PDilocoError):
    """A dataset, corpus or tokenizer could not be loaded."""

    exit_code = 5


class CheckpointError(P2PDilocoError):
    """A checkpoint that cannot be used: unreadable, or made with another run config."""

    exit_code = 6


class OutOfMemory(P2PDilocoError):
    """The inner step does not fit in this peer's memory."""

    exit_code = 7


class ExportError(P2PDilocoError):
    """A model folder that cannot be written or read (``export``, ``sample``, ``join --export``)."""

    exit_code = 8


class LocalWorkerFailed(P2PDilocoError):
    """A local worker of a multi-device peer died or stopped answering (``peer.devices``)."""

    exit_code = 9


def is_out_of_memory(err: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and the CPU allocator's "can't allocate memory"."""
    text = str(err).lower()
    return type(err).__name__ == "OutOfMemoryError" or "out of memory" in text or "can't allocate memory" in text


class AveragingFailed(Exception):
    """A round did not produce a complete, consistent average (never applied)."""


class StateDownloadFailed(Exception):
    """No peer served a usable state within the configured wait."""
