"""Make the sample inputs in this directory: an invoice PDF with a table, a bar-chart PNG, and a two-page
report PDF with text and a figure. Every byte comes from this script (PyMuPDF + Pillow, built-in fonts),
so the samples are ours to license with the project. Deterministic: same library versions, same bytes.

    python samples/make_samples.py [OUT_DIR]
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pymupdf
from PIL import Image, ImageDraw, ImageFont

FIXED_DATE = "D:20250101000000Z"
METADATA = {"producer": "dsvl2 samples/make_samples.py", "creator": "dsvl2", "creationDate": FIXED_DATE,
            "modDate": FIXED_DATE}
FRUIT = [("Apples", 42), ("Bananas", 35), ("Cherries", 18), ("Dates", 27), ("Elderberries", 9)]
ITEMS = [("Widget, small", 4, 2.50), ("Widget, large", 2, 7.25), ("Gear assembly", 1, 19.99),
         ("Service hour", 3, 45.00)]
REPORT_TEXT = [
    "This report summarises fruit sales at the Riverside market during the first quarter. Sales were "
    "recorded daily by each stall and totalled at the end of every week.",
    "Apples remained the best seller, helped by a mild winter and a new cider stall. Bananas followed "
    "closely. Cherries sold less than expected because the season started late.",
    "The market committee recommends extending the opening hours on Saturdays and adding a second "
    "payment terminal, which should shorten queues at the busiest stalls.",
]


def bar_chart(width: int = 640, height: int = 400) -> Image.Image:
    """A bar chart of FRUIT with a title, axis labels and value labels."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    title = ImageFont.load_default(size=20)
    left, right, top, bottom = 70, width - 20, 50, height - 60
    draw.text((width // 2, 15), "Fruit sales, Q1 (crates)", fill="black", font=title, anchor="mt")
    draw.line((left, top, left, bottom), fill="black", width=2)
    draw.line((left, bottom, right, bottom), fill="black", width=2)
    top_value = 50
    for v in range(0, top_value + 1, 10):
        y = bottom - (bottom - top) * v / top_value
        draw.line((left - 5, y, left, y), fill="black")
        draw.text((left - 8, y), str(v), fill="black", font=font, anchor="rm")
    slot = (right - left) / len(FRUIT)
    for i, (name, value) in enumerate(FRUIT):
        x0 = left + i * slot + slot * 0.2
        x1 = left + (i + 1) * slot - slot * 0.2
        y0 = bottom - (bottom - top) * value / top_value
        draw.rectangle((x0, y0, x1, bottom), fill=(66, 99, 216))
        draw.text(((x0 + x1) / 2, y0 - 4), str(value), fill="black", font=font, anchor="md")
        draw.text(((x0 + x1) / 2, bottom + 6), name, fill="black", font=font, anchor="ma")
    draw.text((width // 2, height - 18), "Fruit", fill="black", font=font, anchor="mm")
    draw.text((left, top - 10), "Crates", fill="black", font=font, anchor="mb")
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.quantize(colors=16, dither=Image.Dither.NONE).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _save(doc: pymupdf.Document, path: Path) -> None:
    doc.set_metadata(METADATA)
    doc.save(path, garbage=4, deflate=True, no_new_id=True)
    doc.close()


def invoice(path: Path) -> None:
    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)  # A4 in points
    page.insert_text((50, 70), "INVOICE", fontname="hebo", fontsize=24)
    page.insert_text((50, 100), "Riverside Tools Ltd · 12 Mill Lane · Northtown", fontname="helv", fontsize=10)
    page.insert_text((380, 70), "Invoice no. 2025-0042", fontname="helv", fontsize=10)
    page.insert_text((380, 85), "Date: 15 January 2025", fontname="helv", fontsize=10)
    page.insert_text((50, 140), "Bill to: Market Committee, 3 Quay Street, Northtown", fontname="helv",
                     fontsize=10)
    columns = [50, 270, 330, 430, 545]
    header = ["Item", "Qty", "Unit price", "Amount"]
    y = 180
    row_h = 22
    rows = [header] + [[n, str(q), f"{p:.2f}", f"{q * p:.2f}"] for n, q, p in ITEMS]
    for r, cells in enumerate(rows):
        top = y + r * row_h
        if r == 0:
            page.draw_rect(pymupdf.Rect(columns[0], top, columns[-1], top + row_h), color=None,
                           fill=(0.88, 0.9, 0.95))
        for c, text in enumerate(cells):
            font = "hebo" if r == 0 else "helv"
            page.insert_text((columns[c] + 5, top + 15), text, fontname=font, fontsize=10)
    bottom = y + len(rows) * row_h
    for r in range(len(rows) + 1):
        page.draw_line((columns[0], y + r * row_h), (columns[-1], y + r * row_h), width=0.7)
    for x in columns:
        page.draw_line((x, y), (x, bottom), width=0.7)
    total = sum(q * p for _, q, p in ITEMS)
    page.insert_text((330 + 5, bottom + 25), "Total due", fontname="hebo", fontsize=11)
    page.insert_text((430 + 5, bottom + 25), f"{total:.2f} EUR", fontname="hebo", fontsize=11)
    page.insert_text((50, bottom + 70), "Payment within 30 days. Thank you for your business.",
                     fontname="helv", fontsize=10)
    _save(doc, path)


def report(path: Path) -> None:
    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.insert_text((60, 80), "Riverside Market: Quarterly Report", fontname="hebo", fontsize=20)
    page.insert_text((60, 105), "Prepared by the market committee, April 2025", fontname="helv", fontsize=10)
    page.insert_text((60, 150), "1. Summary", fontname="hebo", fontsize=14)
    page.insert_textbox(pymupdf.Rect(60, 165, 535, 400), "\n\n".join(REPORT_TEXT), fontname="helv",
                        fontsize=11)
    page.insert_text((60, 810), "Page 1 of 2", fontname="helv", fontsize=9)
    page = doc.new_page(width=595, height=842)
    page.insert_text((60, 80), "2. Sales by fruit", fontname="hebo", fontsize=14)
    page.insert_textbox(pymupdf.Rect(60, 95, 535, 160), "Figure 1 shows the crates sold per fruit over the "
                        "quarter. Apples lead with 42 crates.", fontname="helv", fontsize=11)
    page.insert_image(pymupdf.Rect(97, 170, 497, 420), stream=png_bytes(bar_chart()))
    page.insert_text((97, 440), "Figure 1. Fruit sales, Q1 (crates).", fontname="heit", fontsize=10)
    page.insert_text((60, 810), "Page 2 of 2", fontname="helv", fontsize=9)
    _save(doc, path)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    invoice(out / "invoice.pdf")
    report(out / "report.pdf")
    (out / "bar-chart.png").write_bytes(png_bytes(bar_chart()))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
