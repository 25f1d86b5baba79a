"""The errors a stage reports to the user, at the bottom of the import graph.

Each message names the thing at fault and the fix; a stage's ``main`` turns them into one
line on stderr and a non-zero exit instead of a traceback. They live here, apart from the
stages, so that a lower module (device helpers, solvers, tables) never imports a stage.
"""


class TrainError(RuntimeError):
    """A run that cannot start or go on as specified; the message names the run and the fix."""


class FitError(ValueError):
    """A law that cannot be fitted; the message names the dataset, the law and the points."""
