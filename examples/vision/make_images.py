"""Draw the example images and write captions.json: `python examples/vision/make_images.py`.

Flat-coloured 64x64 shapes drawn with Pillow (no anti-aliasing), saved as palette PNGs of a few hundred
bytes each, so the whole example stays far under 100 KB and can be regenerated exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
HERE = Path(__file__).resolve().parent

# name -> (background, [(shape, colour, box or points)], caption)
DRAWINGS: dict[str, tuple[str, list[tuple[str, str, list[int]]], str]] = {
    "red_circle": ("white", [("ellipse", "red", [16, 16, 48, 48])],
                   "A red circle in the centre of a white background."),
    "blue_square": ("white", [("rectangle", "blue", [16, 16, 48, 48])],
                    "A blue square in the centre of a white background."),
    "green_triangle": ("white", [("polygon", "green", [32, 12, 52, 50, 12, 50])],
                       "A green triangle pointing upwards on a white background."),
    "yellow_circle_on_black": ("black", [("ellipse", "yellow", [16, 16, 48, 48])],
                               "A yellow circle on a black background."),
    "black_horizontal_line": ("white", [("rectangle", "black", [4, 28, 60, 36])],
                              "A thick black horizontal line across the middle of a white background."),
    "orange_square_top_left": ("white", [("rectangle", "orange", [4, 4, 22, 22])],
                               "A small orange square in the top-left corner of a white background."),
    "purple_diamond": ("white", [("polygon", "purple", [32, 10, 54, 32, 32, 54, 10, 32])],
                       "A purple diamond shape in the centre of a white background."),
    "red_circle_and_blue_square": ("white", [("ellipse", "red", [4, 20, 28, 44]),
                                             ("rectangle", "blue", [36, 20, 60, 44])],
                                   "A red circle on the left and a blue square on the right, side by side on a white "
                                   "background."),
}  # fmt: skip


def draw(background: str, shapes: list[tuple[str, str, list[int]]]) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), background)
    pen = ImageDraw.Draw(image)
    for shape, colour, coords in shapes:
        getattr(pen, shape)(coords, fill=colour)
    return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)


def main() -> None:
    (HERE / "images").mkdir(exist_ok=True)
    records = []
    for name, (background, shapes, caption) in DRAWINGS.items():
        draw(background, shapes).save(HERE / "images" / f"{name}.png", optimize=True)
        records.append({"image": f"images/{name}.png", "caption": caption})
    (HERE / "captions.json").write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
