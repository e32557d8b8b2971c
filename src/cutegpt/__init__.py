"""CuteGPT: build, fine-tune, chat with and evaluate bilingual LLaMA-family chat models."""

__version__ = "0.1.0"
