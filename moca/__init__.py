"""moca: the MoCa training system (stage 1 continual pre-training, stage 2 contrastive
fine-tuning) on top of ``moca_kernels``."""


def __getattr__(name):  # moca.Encoder without importing the model stack on ``import moca``
    if name == "__version__":  # the distribution's one version, written in moca_kernels
        from moca_kernels import __version__
        return __version__
    if name == "Encoder":
        from .encoder import Encoder
        return Encoder
    raise AttributeError(f"module 'moca' has no attribute {name!r}")
