"""Write the bundled RepControlNet training set: a few real (image, Canny-edge condition) pairs from scikit-image's
sample images, as small PNGs in example_workflows/magic_portrait_repcontrolnet_dataset/.

The pack copies the folder into ComfyUI's input folder when it loads (nodes/example_inputs.py, never overwriting a
file), so the repcontrolnet_train example runs as opened. Pairs sit side by side: NAME.png + NAME_condition.png
(Canny edges, 100/200, of the image at its final size, white on black, 3 channels as the apply example uses).

Sources (all free to redistribute): skimage.data.astronaut() (NASA, public domain), camera() (CC0, Lav Varshney),
chelsea() (CC0, Stefan van der Walt), coffee() (CC0, Rachel Michetti).

    python scripts/make_repcontrolnet_dataset.py [--size 192]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from skimage import data

OUT = Path(__file__).resolve().parent.parent / "example_workflows" / "magic_portrait_repcontrolnet_dataset"
CANNY_LOW, CANNY_HIGH = 100, 200
PNG_COMPRESSION = 9
LICENCE = """RepControlNet training pairs bundled with Magic Portrait (made by scripts/make_repcontrolnet_dataset.py).

NAME.png is the image, NAME_condition.png its Canny edges (OpenCV, thresholds 100/200). Sources, from scikit-image's
sample data: astronaut (Eileen Collins, NASA, public domain), camera (CC0, Lav Varshney), chelsea (CC0, Stefan van der
Walt), coffee (CC0, Rachel Michetti).

Magic Portrait copies this folder into ComfyUI's input folder when ComfyUI loads the pack and never overwrites a file
there. To train on your own data, make a folder next to it (ComfyUI/input/<your folder>) with NAME.png +
NAME_condition.png pairs (or images/ + conditions/ with matching names) and name it in Train RepControlNet's
dataset_folder.
"""


def _bgr(rgb_or_grey: np.ndarray) -> np.ndarray:
    if rgb_or_grey.ndim == 2:
        return cv2.cvtColor(rgb_or_grey, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(rgb_or_grey, cv2.COLOR_RGB2BGR)


def crops() -> dict[str, np.ndarray]:
    """Square crops (BGR) framed on the subject: (top, left, side) in the source image's pixels."""
    astronaut, camera = _bgr(data.astronaut()), _bgr(data.camera())
    chelsea, coffee = _bgr(data.chelsea()), _bgr(data.coffee())

    def square(image: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
        return image[top : top + side, left : left + side]

    return {
        "astronaut_face": square(astronaut, 10, 110, 250),
        "astronaut_portrait": square(astronaut, 0, 0, 512),
        "astronaut_face_mirrored": cv2.flip(square(astronaut, 30, 130, 200), 1),
        "camera_portrait": square(camera, 20, 120, 300),
        "chelsea_face": square(chelsea, 0, 60, 300),
        "coffee_cup": square(coffee, 0, 100, 400),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=192, help="side of every image in pixels (a multiple of 8)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, crop in crops().items():
        image = cv2.resize(crop, (args.size, args.size), interpolation=cv2.INTER_AREA)
        edges = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), CANNY_LOW, CANNY_HIGH)
        for file_name, pixels in ((f"{name}.png", image), (f"{name}_condition.png", _bgr(edges))):
            cv2.imwrite(str(OUT / file_name), pixels, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
            total += (OUT / file_name).stat().st_size
    (OUT / "README.txt").write_text(LICENCE, encoding="utf-8")
    print(f"wrote {len(crops())} pairs ({args.size}x{args.size}) to {OUT}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
