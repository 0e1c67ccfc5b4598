"""Image decoding and resizing with NVIDIA DALI: the optional ``dali`` extra
(``pip install -e ".[dali]"``), chosen with the trainer setting ``image_decoder=dali-gpu`` (nvJPEG
and the GPU's JPEG decoder, resizing on the GPU) or ``dali-cpu`` (DALI's CPU-only mode,
``device_id=None``, which also runs on machines without a GPU).

The images come out as ``moca.data.images.image_rows`` makes them: the same fitted size (sides
multiples of 28 within the pixel bounds), the CLIP mean and std, the same patch rows. Only the
resampling differs: DALI's antialiased cubic filter against Pillow's bicubic one, at most one
level of 255 apart in tests/test_data_dali.py. Patch rows are made on the host, where collation
happens; images are decoded a document at a time.
"""
from __future__ import annotations

import numpy as np

from .images import CLIP_MEAN, CLIP_STD, patchify

DEVICES = ("cpu", "gpu")


def _reason(exc: Exception) -> str:
    """What a DALI pipeline error says went wrong: the first line after "encountered:" (the
    message also holds the pipeline's definition, with a traceback into this file)."""
    said = str(exc).split("encountered:", 1)[-1]
    lines = [line.strip().rstrip(" :") for line in said.splitlines() if line.strip()]
    return (lines or [type(exc).__name__])[0][:200]


class DaliImages:
    """Decodes encoded images (PNG, JPEG, ...) to patch rows, ``batch`` images per pipeline run."""

    def __init__(self, device: str = "cpu", batch: int = 32, threads: int = 2):
        if device not in DEVICES:
            raise ValueError(f"DALI device must be one of {DEVICES}, got {device!r}")
        try:
            from nvidia.dali import fn, pipeline_def, types
        except ImportError:
            raise ValueError("image_decoder=dali-* needs NVIDIA DALI: pip install -e \".[dali]\" (the "
                             "nvidia-dali-cuda130 wheel; use nvidia-dali-cuda120 with a CUDA 12 torch)") from None
        if device == "gpu":
            import torch
            if not torch.cuda.is_available():
                raise ValueError("image_decoder=dali-gpu needs a CUDA device; use dali-cpu or pil here")
            device_id = torch.cuda.current_device()
        else:
            device_id = None  # DALI's CPU-only mode

        # one batch in flight: each run consumes exactly what was fed for it
        @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id, exec_dynamic=True,
                      prefetch_queue_depth=1)
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            size = fn.external_source(name="size", dtype=types.FLOAT)
            image = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
            image = fn.resize(image, size=size, interp_type=types.INTERP_CUBIC, antialias=True)
            return fn.crop_mirror_normalize(image, dtype=types.FLOAT, output_layout="HWC",
                                            mean=(255 * CLIP_MEAN).tolist(), std=(255 * CLIP_STD).tolist())

        self.batch, self.device, self._pipeline = batch, device, pipeline
        self.pipe = pipeline()
        self.pipe.build()

    def rows(self, encoded: list[bytes], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """Patch rows (patches, 1176) of each image, resized to its (height, width) in ``sizes``.
        ValueError when an image cannot be decoded."""
        out = []
        for start in range(0, len(encoded), self.batch):
            chunk = encoded[start:start + self.batch]
            self.pipe.feed_input("encoded", [np.frombuffer(e, dtype=np.uint8) for e in chunk])
            self.pipe.feed_input("size", [np.array(s, dtype=np.float32) for s in sizes[start:start + self.batch]])
            try:
                (images,) = self.pipe.run()
            except (RuntimeError, IndexError) as exc:
                self.pipe = self._pipeline()  # a pipeline that failed is no longer valid
                self.pipe.build()
                raise ValueError(f"DALI could not decode an image: {_reason(exc)}") from None
            if self.device == "gpu":
                images = images.as_cpu()
            out += [patchify(np.array(images[i]))[0] for i in range(len(chunk))]
        return out
