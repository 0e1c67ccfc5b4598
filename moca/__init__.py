"""moca: the MoCa training system (stage 1 continual pre-training, stage 2 contrastive
fine-tuning) on top of ``moca_kernels``."""

__version__ = "0.1.0"
