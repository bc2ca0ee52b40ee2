"""One small class per optimizer: hyperparameters, slot names, and which rule."""

from sparseopt.optimizers.adadelta import Adadelta
from sparseopt.optimizers.adafactor import Adafactor
from sparseopt.optimizers.adagrad import Adagrad
from sparseopt.optimizers.adam import Adam
from sparseopt.optimizers.adamax import Adamax
from sparseopt.optimizers.adamw import AdamW
from sparseopt.optimizers.ftrl import Ftrl
from sparseopt.optimizers.lamb import Lamb
from sparseopt.optimizers.lion import Lion
from sparseopt.optimizers.nadam import Nadam
from sparseopt.optimizers.rmsprop import RMSprop
from sparseopt.optimizers.rowwise_adagrad import RowwiseAdagrad
from sparseopt.optimizers.sgd import SGD

__all__ = ["Adadelta", "Adafactor", "Adagrad", "Adam", "Adamax", "AdamW", "Ftrl", "Lamb", "Lion", "Nadam", "RMSprop",
           "RowwiseAdagrad", "SGD"]
