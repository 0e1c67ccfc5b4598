"""``loss.png``: a run's logged losses against the step."""
from __future__ import annotations


def plot_metrics(metrics: list[dict], path: str) -> None:
    """loss.png: the logged losses against the step (drawn with Pillow, no plotting package)."""
    from PIL import Image, ImageDraw
    series = {k: [(m["step"], m[k]) for m in metrics if m.get(k) is not None] for k in ("loss", "mlm_loss", "mae_loss")}
    points = [p for s in series.values() for p in s]
    if not points:
        return
    width, height, pad = 640, 400, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points) or 1
    y0, y1 = 0.0, max(p[1] for p in points) or 1.0
    sx = lambda x: pad + (x - x0) / max(1e-9, x1 - x0) * (width - 2 * pad)  # noqa: E731
    sy = lambda y: height - pad - (y - y0) / max(1e-9, y1 - y0) * (height - 2 * pad)  # noqa: E731
    draw.rectangle((pad, pad, width - pad, height - pad), outline="gray")
    for (name, s), color in zip(series.items(), ("black", "blue", "red")):
        if len(s) > 1:
            draw.line([(sx(x), sy(y)) for x, y in s], fill=color, width=2)
        draw.text((pad + 10, pad + 10 + 14 * ("loss", "mlm_loss", "mae_loss").index(name)), name, fill=color)
    draw.text((pad, height - pad + 8), f"step {x0} .. {x1}; loss 0 .. {y1:.2f}", fill="black")
    image.save(path)
