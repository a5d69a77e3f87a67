"""Typed exceptions. Library code raises these; only the CLI turns them into one-line messages."""

from __future__ import annotations


class MPQSearchError(Exception):
    """Root of every error this package raises on purpose."""


class ModelNotFoundError(MPQSearchError):
    """A model spec names no embedded model, no directory, and cannot be fetched."""


class InvalidModelError(MPQSearchError):
    """A directory exists but is not a loadable diffusers pipeline (or its weights are corrupt)."""


class UnsupportedPipelineError(MPQSearchError):
    """A loadable pipeline of a class that no trajectory family samples (the message lists the
    supported ones)."""


class UnknownFeatureNetError(MPQSearchError):
    """A feature-extractor name is not one of the supported ones."""


class BitMapError(MPQSearchError):
    """A bit map is malformed, names unknown layers, has bits out of range, or is for another
    model."""


class BudgetError(MPQSearchError):
    """A budget string is malformed."""


class InfeasibleBudgetError(BudgetError):
    """A budget is below the cheapest configuration the candidate bit-widths allow."""


class CalibrationError(MPQSearchError):
    """Quantization was requested before calibration, or calibration failed."""


class NonFiniteSamplesError(MPQSearchError):
    """A (quantized) model produced NaN or Inf samples."""


class StudyError(MPQSearchError):
    """A study is missing, or its stored settings disagree with the request."""


class ConfigError(StudyError, CalibrationError):
    """A setting is invalid: a value out of range, an unknown name or option, or a config file
    that cannot be read (`mpq_search.config`). It is a StudyError and a CalibrationError, what
    the study's and the quantizer's settings raised before they shared one check."""


class StudyNotFoundError(StudyError):
    """The storage holds no study of the requested name (the storage itself was reachable)."""


class DiskFullError(MPQSearchError):
    """A write found no space left (ENOSPC, a disk quota, or SQLite's "database or disk is
    full"); the message names the path. What was written before it stays whole (`files`), so
    freeing space and running the same command again resumes."""


class MPQSearchWarning(UserWarning):
    """Root of the warnings this package emits; the CLI prints each as one line."""


class RoundingMismatchWarning(MPQSearchWarning):
    """A bit map is applied with another weight rounding or grid than the one it records (it
    was searched for that quantizer: its layers' errors were ranked under it)."""
