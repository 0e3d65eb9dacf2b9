"""One LightningModule per optimizer family."""

from flatlit.methods.base import ClassificationModule
from flatlit.methods.entropy_sgd import EntropySGD
from flatlit.methods.lpf import LPFSGD
from flatlit.methods.nsgd import NSGD
from flatlit.methods.perturbation import PerturbationModule
from flatlit.methods.sam import SAM
from flatlit.methods.sgd import SGDFamily
from flatlit.methods.smoothout import SmoothOut

__all__ = [
    "LPFSGD",
    "NSGD",
    "SAM",
    "ClassificationModule",
    "EntropySGD",
    "PerturbationModule",
    "SGDFamily",
    "SmoothOut",
]
