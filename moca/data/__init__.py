"""Data for both stages: JSON Lines records, images as Qwen2-VL sees them, masking, packing."""
