"""`cutegpt export`: every export format. cli.py (the command), hf.py (merged safetensors folder), gguf.py (one
file for llama.cpp / ollama / LM Studio) and verify.py (the GGUF checked in llama.cpp against transformers)."""
