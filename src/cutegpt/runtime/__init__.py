"""Runtimes below chat, serve, export and evaluation: llama.cpp (llamacpp.py)."""
