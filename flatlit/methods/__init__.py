"""One LightningModule per optimizer family."""

from flatlit.methods.base import ClassificationModule
from flatlit.methods.sgd import SGDFamily

__all__ = ["ClassificationModule", "SGDFamily"]
