"""Contact sheet of `text_scene` images with their label polygons drawn, to judge realism by eye; also times
generation.

    python bench/text_scene_preview.py --out /tmp/text_scene_preview.png --per-style 6 --seed 0

Scenes are written with `generate_text_scenes` and read back with the PaddleOCR label reader, so the sheet
shows what a training run reads: green = legible line, red = '###'. Top rows: train style; bottom: val.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from slimrecipe.datasets.text_det import load_image_bgr, read_paddleocr_det_labels
from slimrecipe.datasets.text_scene import generate_text_scenes


def thumbnail(record, cell: int) -> np.ndarray:
    image = load_image_bgr(record.image_path)
    for poly, ignored in zip(record.polys, record.ignore):
        colour = (0, 0, 255) if ignored else (0, 220, 0)
        cv2.polylines(image, [np.round(poly).astype(np.int32)], True, colour, 2, cv2.LINE_AA)
    scale = cell / max(image.shape[:2])
    image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                       interpolation=cv2.INTER_AREA)
    out = np.full((cell, cell, 3), 40, np.uint8)
    out[: image.shape[0], : image.shape[1]] = image
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("text_scene_preview.png"))
    parser.add_argument("--per-style", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cell", type=int, default=480)
    parser.add_argument("--columns", type=int, default=3)
    parser.add_argument("--resources", choices=["declared", "installed"], default="declared")
    args = parser.parse_args()

    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        for style in ("train", "val"):
            start = time.perf_counter()
            label_file = generate_text_scenes(tmp, count=args.per_style, seed=args.seed, style=style,
                                              resources=args.resources)
            elapsed = time.perf_counter() - start
            records = read_paddleocr_det_labels(label_file, tmp)
            lines = sum(len(r.polys) for r in records)
            ignored = sum(int(r.ignore.sum()) for r in records)
            print(f"{style}: {args.per_style / elapsed:.1f} images/s (written as JPEG), {lines} lines, "
                  f"{ignored} '###'")
            cells += [thumbnail(r, args.cell) for r in records]
    rows = [cells[i : i + args.columns] for i in range(0, len(cells), args.columns)]
    rows[-1] += [np.zeros_like(cells[0])] * (args.columns - len(rows[-1]))
    sheet = np.vstack([np.hstack(row) for row in rows])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), sheet)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
