"""Construction-time checks of the optimizers' arguments: see :mod:`sparseopt._hyperparameters`."""

from sparseopt._hyperparameters import check_range, is_number  # noqa: F401
