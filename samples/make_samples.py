"""Draw the bundled sample images (deterministic; Pillow and its default font only).

    python samples/make_samples.py [OUT_DIR]

Sizes are chosen so the tile counts differ (InternVL2, max 12 tiles; thumbnail included):
chart 900x600 -> 3x2 grid, 7 tiles; document 600x800 -> 3x4, 13; shapes 448x448 -> 1; wide 2400x300 -> 8x1, 9;
tall 300x2000 -> 1x7, 8. Images are saved as optimised palette PNGs so each stays well under 60 KB.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WHITE = (255, 255, 255)
BLACK = (20, 20, 20)
GREY = (150, 150, 150)
PALETTE = [(220, 60, 50), (50, 120, 200), (60, 160, 80), (240, 180, 40), (140, 80, 170), (240, 120, 30)]


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def save(image: Image.Image, path: Path, *, colours: int = 32) -> None:
    # A small adaptive palette keeps anti-aliased text readable and the files small.
    image.quantize(colors=colours, dither=Image.Dither.NONE).save(path, optimize=True)


def chart() -> Image.Image:
    """A bar chart of monthly sales with a title, axis labels, ticks and value labels."""
    image = Image.new("RGB", (900, 600), WHITE)
    draw = ImageDraw.Draw(image)
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun"]
    sales = [42, 55, 38, 71, 64, 49]
    left, right, top, bottom = 110, 860, 80, 500
    draw.text((450, 30), "Monthly sales, 2024 (thousand units)", fill=BLACK, font=font(26), anchor="mm")
    for value in range(0, 81, 20):
        y = bottom - (bottom - top) * value / 80
        draw.line((left, y, right, y), fill=(225, 225, 225), width=1)
        draw.text((left - 12, y), str(value), fill=BLACK, font=font(18), anchor="rm")
    draw.line((left, top, left, bottom), fill=BLACK, width=2)
    draw.line((left, bottom, right, bottom), fill=BLACK, width=2)
    slot = (right - left) / len(months)
    for i, (month, value) in enumerate(zip(months, sales, strict=True)):
        x0 = left + i * slot + slot * 0.2
        x1 = left + (i + 1) * slot - slot * 0.2
        y = bottom - (bottom - top) * value / 80
        draw.rectangle((x0, y, x1, bottom), fill=PALETTE[1] if month != "Apr" else PALETTE[0])
        draw.text(((x0 + x1) / 2, y - 8), str(value), fill=BLACK, font=font(18), anchor="mb")
        draw.text(((x0 + x1) / 2, bottom + 12), month, fill=BLACK, font=font(20), anchor="mt")
    draw.text(((left + right) / 2, 570), "Month", fill=BLACK, font=font(22), anchor="mm")
    label = Image.new("RGB", (300, 40), WHITE)
    ImageDraw.Draw(label).text((150, 20), "Sales (thousand units)", fill=BLACK, font=font(22), anchor="mm")
    image.paste(label.rotate(90, expand=True), (20, (top + bottom) // 2 - 150))
    return image


def document() -> Image.Image:
    """A one-page memo: a heading, a date line, paragraphs and a short numbered list."""
    image = Image.new("RGB", (600, 800), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((40, 40), "Quarterly Operations Memo", fill=BLACK, font=font(30))
    draw.text((40, 85), "To: All staff    From: Operations    Date: 3 March 2025", fill=GREY, font=font(15))
    draw.line((40, 112, 560, 112), fill=GREY, width=1)
    paragraphs = [
        "The warehouse move finished two weeks ahead of plan. Shipping times fell from four days to three, "
        "and returns are now handled at the new site on Harbour Road.",
        "Energy use dropped by 12 percent after the lighting upgrade. The second phase, covering the loading "
        "bays, starts in May and should be complete by the end of June.",
        "Please note the following changes:",
    ]
    y = 130
    for paragraph in paragraphs:
        y = _wrapped(draw, paragraph, x=40, y=y, width=520, size=17) + 14
    for n, item in enumerate(
        ["Badges are required at every entrance.", "The canteen opens at 7:30.", "Parking lot B is closed."],
        start=1,
    ):
        draw.text((60, y), f"{n}. {item}", fill=BLACK, font=font(17))
        y += 28
    y = _wrapped(
        draw, "Questions about these changes can be sent to the operations desk, extension 4410.",
        x=40, y=y + 14, width=520, size=17,
    )
    draw.text((40, 740), "Page 1 of 1", fill=GREY, font=font(14))
    return image


def _wrapped(draw: ImageDraw.ImageDraw, text: str, *, x: int, y: int, width: int, size: int) -> int:
    """Draw ``text`` word-wrapped to ``width`` pixels; return the y below the last line."""
    line = ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font(size)) > width and line:
            draw.text((x, y), line, fill=BLACK, font=font(size))
            y += int(size * 1.5)
            line = word
        else:
            line = trial
    draw.text((x, y), line, fill=BLACK, font=font(size))
    return y + int(size * 1.5)


def shapes() -> Image.Image:
    """Coloured shapes on a plain floor: 3 circles, 2 squares, 1 triangle (a counting question)."""
    image = Image.new("RGB", (448, 448), (235, 232, 222))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 330, 448, 448), fill=(200, 195, 180))
    draw.ellipse((40, 60, 140, 160), fill=PALETTE[0], outline=BLACK, width=2)
    draw.ellipse((300, 40, 380, 120), fill=PALETTE[1], outline=BLACK, width=2)
    draw.ellipse((200, 250, 260, 310), fill=PALETTE[0], outline=BLACK, width=2)
    draw.rectangle((180, 90, 260, 170), fill=PALETTE[2], outline=BLACK, width=2)
    draw.rectangle((320, 260, 410, 350), fill=PALETTE[3], outline=BLACK, width=2)
    draw.polygon([(60, 380), (150, 380), (105, 290)], fill=PALETTE[4], outline=BLACK)
    return image


def wide() -> Image.Image:
    """A panorama: banded sky, a sun, two mountain ranges, a lake and a signpost."""
    rng = random.Random(7)
    image = Image.new("RGB", (2400, 300), WHITE)
    draw = ImageDraw.Draw(image)
    for band in range(6):
        shade = 150 + band * 15
        draw.rectangle((0, band * 30, 2400, (band + 1) * 30), fill=(shade - 60, shade - 20, 255))
    draw.ellipse((1900, 30, 1980, 110), fill=(250, 210, 60))
    for colour, base, height in (((120, 130, 150), 210, 150), ((80, 110, 90), 230, 90)):
        points = [(0, base)]
        for x in range(0, 2401, 100):
            points.append((x, base - rng.randint(height // 3, height)))
        points += [(2400, base), (2400, 300), (0, 300)]
        draw.polygon(points, fill=colour)
    draw.rectangle((0, 240, 2400, 300), fill=(70, 120, 180))
    draw.rectangle((1195, 150, 1205, 250), fill=(90, 60, 30))
    draw.rectangle((1130, 140, 1270, 175), fill=(240, 230, 200), outline=BLACK)
    draw.text((1200, 158), "LAKE VIEW 2 km", fill=BLACK, font=font(16), anchor="mm")
    return image


def tall() -> Image.Image:
    """A vertical infographic: five numbered steps in coloured boxes and a footer line."""
    image = Image.new("RGB", (300, 2000), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((150, 50), "How to brew tea", fill=BLACK, font=font(24), anchor="mm")
    steps = ["Boil water", "Warm the pot", "Add tea leaves", "Steep 4 minutes", "Pour and enjoy"]
    for i, step in enumerate(steps):
        y = 120 + i * 350
        draw.rounded_rectangle((30, y, 270, y + 260), radius=18, fill=PALETTE[i % len(PALETTE)])
        draw.text((150, y + 90), f"Step {i + 1}", fill=WHITE, font=font(30), anchor="mm")
        draw.text((150, y + 160), step, fill=WHITE, font=font(22), anchor="mm")
        if i < len(steps) - 1:
            draw.polygon([(140, y + 275), (160, y + 275), (150, y + 330)], fill=GREY)
    draw.text((150, 1965), "Serves two people", fill=BLACK, font=font(18), anchor="mm")
    return image


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, draw in (("chart", chart), ("document", document), ("shapes", shapes), ("wide", wide), ("tall", tall)):
        save(draw(), out_dir / f"{name}.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
