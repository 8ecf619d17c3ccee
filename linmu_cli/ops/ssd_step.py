"""The SSD decode step now lives in `linmu_cli.ops.ssd.step`; this name stays for the bench and its GPU tests."""

from linmu_cli.ops.ssd.step import last_ssd_step_backend, ssd_step, step_backend

__all__ = ["last_ssd_step_backend", "ssd_step", "step_backend"]
