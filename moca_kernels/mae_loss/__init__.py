from .op import mae_loss
from .reference import mae_loss_reference

__all__ = ["mae_loss", "mae_loss_reference"]
