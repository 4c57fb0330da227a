"""Write the example workflows' input images into example_workflows/ (the runner finds inputs there):

- magic_portrait_astronaut.png: skimage.data.astronaut(), a real portrait (public domain, NASA)
- magic_portrait_style.png: OpenCV's edge-preserving stylization of skimage.data.coffee(), a painterly style reference
- magic_portrait_condition.png: Canny edges of the portrait, a condition image for RepControlNet
- magic_portrait_reference_2.png: a second person, LFW face 2 of skimage.data.lfw_subset() (25 px, grey) upscaled
- magic_portrait_group_layout.png: both people side by side at 768x512, the layout of the group-photo example

    python scripts/make_demo_images.py
"""

from pathlib import Path

import cv2
import numpy as np
from skimage import data

OUT = Path(__file__).resolve().parent.parent / "example_workflows"


def main() -> None:
    portrait = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(OUT / "magic_portrait_astronaut.png"), portrait)
    coffee = cv2.resize(cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR), (512, 512), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(OUT / "magic_portrait_style.png"), cv2.stylization(coffee, sigma_s=60, sigma_r=0.45))
    edges = cv2.Canny(cv2.cvtColor(portrait, cv2.COLOR_BGR2GRAY), 100, 200)
    cv2.imwrite(str(OUT / "magic_portrait_condition.png"), cv2.cvtColor(edges, cv2.COLOR_GRAY2BGR))
    lfw = (data.lfw_subset()[2] * 255).round().astype("uint8")
    face = cv2.cvtColor(cv2.resize(lfw, (224, 224), interpolation=cv2.INTER_CUBIC), cv2.COLOR_GRAY2BGR)
    second = np.full((320, 320, 3), 118, np.uint8)  # the tight LFW crop on a margin, so the face box fits
    second[48:272, 48:272] = face
    cv2.imwrite(str(OUT / "magic_portrait_reference_2.png"), second)
    layout = np.full((512, 768, 3), 118, np.uint8)
    head = cv2.resize(portrait[0:300, 100:350], (300, 360), interpolation=cv2.INTER_AREA)
    layout[76:436, 54:354] = head
    layout[96:416, 414:734] = second
    cv2.imwrite(str(OUT / "magic_portrait_group_layout.png"), layout)
    for name in ("magic_portrait_astronaut.png", "magic_portrait_style.png", "magic_portrait_condition.png",
                 "magic_portrait_reference_2.png", "magic_portrait_group_layout.png"):
        print("wrote", OUT / name, (OUT / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
