"""Reward components by the name a task's yaml uses."""

from .toy import Concise, Correct, Polite

COMPONENTS = {"correct": Correct, "polite": Polite, "concise": Concise}
