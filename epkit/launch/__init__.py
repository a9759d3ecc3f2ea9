"""Deployments: start a topology's engine on this machine or on Slurm, wait, watch, stop.

    from epkit.launch import deploy, SlurmExecutor
    with deploy(topology, SlurmExecutor(timeout_min=60, partition="gpu")) as d:
        d.wait_ready()
        ...

A :class:`~epkit.topology.DisaggTopology` deploys as a :class:`DisaggDeployment` (every prefill and decode
instance, then the router in front of them). :data:`EXECUTORS` maps the words used in sweep YAML to executor classes.
"""

from epkit.launch.deployment import Deployment, DeploymentFailed, deploy
from epkit.launch.disagg import DisaggDeployment
from epkit.launch.failure import Failure
from epkit.launch.local import LocalExecutor
from epkit.launch.slurm import SlurmExecutor

EXECUTORS = {"local": LocalExecutor, "slurm": SlurmExecutor}

__all__ = ["EXECUTORS", "Deployment", "DeploymentFailed", "DisaggDeployment", "Failure", "LocalExecutor", "SlurmExecutor", "deploy"]
