"""Write the example workflows' input images into example_workflows/ (the runner finds inputs there):

- magic_portrait_astronaut.png: skimage.data.astronaut(), a real portrait (public domain, NASA)
- magic_portrait_style.png: OpenCV's edge-preserving stylization of skimage.data.coffee(), a painterly style reference
- magic_portrait_condition.png: Canny edges of the portrait, a condition image for RepControlNet

    python scripts/make_demo_images.py
"""

from pathlib import Path

import cv2
from skimage import data

OUT = Path(__file__).resolve().parent.parent / "example_workflows"


def main() -> None:
    portrait = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(OUT / "magic_portrait_astronaut.png"), portrait)
    coffee = cv2.resize(cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR), (512, 512), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(OUT / "magic_portrait_style.png"), cv2.stylization(coffee, sigma_s=60, sigma_r=0.45))
    edges = cv2.Canny(cv2.cvtColor(portrait, cv2.COLOR_BGR2GRAY), 100, 200)
    cv2.imwrite(str(OUT / "magic_portrait_condition.png"), cv2.cvtColor(edges, cv2.COLOR_GRAY2BGR))
    for name in ("magic_portrait_astronaut.png", "magic_portrait_style.png", "magic_portrait_condition.png"):
        print("wrote", OUT / name, (OUT / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
