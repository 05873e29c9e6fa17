"""A grader for the "becoming a backprop ninja" notebook: ``from backprop.exercise import grade``.

Self-contained: it recomputes the notebook's forward and autograd's gradients itself.
"""

from backprop.exercise.cli import cli_main
from backprop.exercise.grade import GradeResult, Row, grade
from backprop.exercise.training import TrainingResult, grade_training

__all__ = ["GradeResult", "Row", "TrainingResult", "cli_main", "grade", "grade_training"]
