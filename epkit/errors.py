"""epkit's exception tree: one base class, one subclass per place things go wrong."""


class EpkitError(Exception):
    """Base of every error epkit raises on purpose."""


class TopologyError(EpkitError, ValueError):
    """A model, topology, EPLB config or spec is invalid; raised before anything starts."""


class LaunchError(EpkitError):
    """A deployment could not be started or did not become ready."""


class EngineError(EpkitError):
    """The built-in engine met a condition it cannot serve under."""


class EpkitDeprecationWarning(FutureWarning):
    """A spelling epkit still reads but will drop (shown by default; ``epkit`` prints it as one line)."""
