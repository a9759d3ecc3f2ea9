"""epkit: plan, launch, sweep and compare expert-parallel MoE deployments."""

from epkit.errors import EngineError, EpkitError, LaunchError, TopologyError

__version__ = "0.1.0"

# Loaded on first use (PEP 562), so `import epkit` (as every engine process does) stays the exception tree only.
_LAZY = {"DisaggTopology": "epkit.topology.disagg", "KVTransferConfig": "epkit.topology.kv_transfer",
         "RouterConfig": "epkit.topology.disagg"}

__all__ = ["DisaggTopology", "EngineError", "EpkitError", "KVTransferConfig", "LaunchError", "RouterConfig",
           "TopologyError", "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'epkit' has no attribute {name!r}")
    if name == "KVTransferConfig":
        from epkit.topology.kv_transfer import KVTransferConfig

        return KVTransferConfig
    from epkit.topology import disagg

    return getattr(disagg, name)
