"""Experiment tracking. ``base`` defines the interface; only ``tracking.mlflow`` imports mlflow."""

from medsynth.tracking.base import NullTracker, Tracker

__all__ = ["NullTracker", "Tracker"]
