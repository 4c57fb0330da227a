"""Write icon.png, the pack's registry icon (pyproject [tool.comfy] Icon points at it on GitHub): the astronaut
portrait of the examples (skimage.data.astronaut(), public domain, NASA), the left half of the face as the photo
and the right half stylised, which is what the pack does. Square, 256 px (the registry takes at most 800 x 400).

    python scripts/make_icon.py
"""

from pathlib import Path

import cv2
import numpy as np
from skimage import data

OUT = Path(__file__).resolve().parent.parent / "icon.png"
SIZE = 256


def main() -> None:
    portrait = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    face = cv2.resize(portrait[20:300, 95:375], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    styled = cv2.stylization(face, sigma_s=60, sigma_r=0.6)
    top, bottom = (SIZE * 9 // 20, 0), (SIZE * 11 // 20, SIZE)  # a slightly slanted split through the face
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    right = cols > top[0] + (bottom[0] - top[0]) * rows / SIZE
    icon = np.where(right[..., None], styled, face)
    cv2.line(icon, top, bottom, (255, 255, 255), 3, lineType=cv2.LINE_AA)
    cv2.imwrite(str(OUT), icon, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print("wrote", OUT, OUT.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
