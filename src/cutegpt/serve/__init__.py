"""`cutegpt serve`: an OpenAI-compatible server (llama.cpp in-process, or vLLM on GPUs).

Kept light: importing this package does not load torch or llama.cpp.
"""

from cutegpt.serve.config import ServeConfig
from cutegpt.serve.run import run_serve

__all__ = ["ServeConfig", "run_serve"]
