"""Shared pytest configuration."""
from __future__ import annotations


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    """Saved pytest-benchmark runs carry the project's environment: torch, triton and natten versions, CPU
    and threads, and on NVIDIA GPUs the nvidia-ml-py readings (name, driver, clocks, power, temperature)."""
    from bench.env import environment

    machine_info["sasa_bench"] = environment()
