"""The registry of workloads: name -> module with sizes, implementations, build, reference."""

from __future__ import annotations

import importlib

MODULES = {
    "w1": "w1_cleaning",
    "w2": "w2_hyperrep",
    "w2-share": "w2_share",
    "w3": "w3_forward",
    "w4": "w4_implicit",
}


def get(name: str):
    if name not in MODULES:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(MODULES)}")
    return importlib.import_module(f".{MODULES[name]}", __package__)
