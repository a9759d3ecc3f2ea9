"""epkit: plan, launch, sweep and compare expert-parallel MoE deployments."""

from epkit.errors import EngineError, EpkitError, LaunchError, TopologyError

__version__ = "0.1.0"

__all__ = ["EngineError", "EpkitError", "LaunchError", "TopologyError", "__version__"]
