from .op import info_nce
from .reference import info_nce_reference

__all__ = ["info_nce", "info_nce_reference"]
