"""The names of the files and folders cotune writes, spelled once.

A run directory (what `cotune run` writes, `cotune report` / `generate` / `export` read, and a user
opens):

    <run_dir>/config.yaml                       CONFIG_FILE: the resolved config
    <run_dir>/metrics.jsonl                     METRICS_FILE: one JSON record per line
    <run_dir>/.lock                             LOCK_FILE: names the process that holds the run
    <run_dir>/checkpoints/round-NNNN/           CHECKPOINTS_DIR (runtime.checkpoint names the rounds)
        <adapter>/adapter_model.safetensors     ADAPTER_WEIGHTS  } one adapter, in PEFT's format
        <adapter>/adapter_config.json           ADAPTER_CONFIG   }
        state.pt                                STATE_FILE: round, fingerprint, RNG, trainer states
    <run_dir>/report.md, plots/                 REPORT_FILE, PLOTS_DIR
    <run_dir>/audit.json                        AUDIT_FILE: `cotune audit`'s membership inference
    <run_dir>/tensorboard/, mlruns/             TENSORBOARD_DIR, MLFLOW_DIR (run.loggers)
    <run_dir>/flower/                           FLOWER_DIR: a Flower run's logs and node states
        flwr-run.log, simulation.log, node-state/   FLWR_RUN_LOG, SIMULATION_LOG, NODE_STATE_DIR

Layer 0 (no imports): reporting reads what the runtime writes, so both take the names from here.
Tests may spell a path out where they assert the layout a user sees.
"""

from __future__ import annotations

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.pt"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
AUDIT_FILE = "audit.json"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
FLOWER_DIR = "flower"
FLWR_RUN_LOG = "flwr-run.log"
SIMULATION_LOG = "simulation.log"
NODE_STATE_DIR = "node-state"
