"""tspin-ray: self-play fine-tuning (T-SPIN, SPIN, SPACE, SFT) on Ray."""

__version__ = "0.1.0"
