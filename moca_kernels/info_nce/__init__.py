from .distributed import all_gather_with_grad
from .op import info_nce
from .reference import info_nce_reference

__all__ = ["all_gather_with_grad", "info_nce", "info_nce_reference"]
