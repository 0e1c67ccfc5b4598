"""moca: the MoCa training system (stage 1 continual pre-training, stage 2 contrastive
fine-tuning) on top of ``moca_kernels``."""

__version__ = "0.1.0"


def __getattr__(name):  # moca.Encoder without importing the model stack on ``import moca``
    if name == "Encoder":
        from .encoder import Encoder
        return Encoder
    raise AttributeError(f"module 'moca' has no attribute {name!r}")
