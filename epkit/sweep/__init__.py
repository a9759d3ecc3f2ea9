"""Sweeps: expand a YAML spec into topology × workload points, run them, keep their results.

    from epkit.sweep import load_sweep, run_sweep
    run_sweep(load_sweep("launchers/local/quickstart.yaml"), results_root="results/mine")

``spec`` expands and checks the spec (pure), ``runner`` deploys each topology and drives its
workloads (resuming from what the results folder already holds), ``store`` is that folder.
"""

from epkit.sweep.runner import SweepRunner, run_sweep
from epkit.sweep.spec import SweepSpec, load_sweep, parse_sweep, plan_sweep

__all__ = ["SweepRunner", "SweepSpec", "load_sweep", "parse_sweep", "plan_sweep", "run_sweep"]
