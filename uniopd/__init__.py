"""uniopd: on-policy distillation (OPD) with the Uni-OPD recipe."""

__version__ = "0.1.0"
