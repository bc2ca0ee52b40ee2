"""sparseopt: gradient optimizers for embedding-heavy training, dense and row-wise sparse.

Importing this package touches neither TensorFlow nor CUDA.
"""

from sparseopt import errors, schedules
from sparseopt._config import get_num_threads, set_num_threads
from sparseopt.custom import IdleSteps, Rule, idle_columns
from sparseopt.indexed_slices import IndexedSlices
from sparseopt.optimizer import Optimizer
from sparseopt.optimizers import (SGD, Adadelta, Adafactor, Adagrad, Adam, Adamax, AdamW, Ftrl, Lamb, Lion, Nadam,
                                  RMSprop, RowwiseAdagrad)
from sparseopt.saving import load, save

__version__ = "0.1.0"

__all__ = ["Adadelta", "Adafactor", "Adagrad", "Adam", "Adamax", "AdamW", "Ftrl", "IdleSteps", "IndexedSlices", "Lamb",
           "Lion", "Nadam", "Optimizer", "RMSprop", "RowwiseAdagrad", "Rule", "SGD", "errors", "get_num_threads",
           "idle_columns", "load", "save", "schedules", "set_num_threads"]
