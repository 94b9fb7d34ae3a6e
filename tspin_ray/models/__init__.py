"""Checkpoints: safe loading (checkpoints.py), chat format (chat_format.py), LoRA, tiny and family miniatures."""
