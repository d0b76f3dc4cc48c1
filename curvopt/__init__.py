"""curvopt: curvature-aware optimization of language models (LANTON, CAPO, OTA+FFG)."""

__version__ = '0.1.0'
