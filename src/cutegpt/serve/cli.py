"""`cutegpt serve` entry point for the command table (see `cutegpt.serve.run`)."""

from cutegpt.serve.config import ServeConfig
from cutegpt.serve.run import run_serve

__all__ = ["ServeConfig", "run_serve"]
