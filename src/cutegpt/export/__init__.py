"""Export models to other formats (GGUF for llama.cpp)."""
