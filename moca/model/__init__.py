"""Qwen2-VL / Qwen2.5-VL made bidirectional and fed packed documents on moca_kernels' attention."""
