"""slimrecipe: declarative compression recipes for PaddlePaddle models."""

__version__ = "0.1.0"
