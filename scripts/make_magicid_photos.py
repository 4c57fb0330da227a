"""Write the MagicID photo set the pack ships: example_workflows/magic_portrait_magicid_photos/.

Six photos, each NAME.jpg/png with its skeleton NAME.json beside it (an OpenPose frame: COCO-18 body in pixels,
canvas = the photo's size), the input of the magicid_dataset example (Build MagicID Dataset):

- astronaut.jpg: skimage.data.astronaut() (Eileen Collins, NASA, public domain);
- reference_2.png and group_layout.jpg: the second portrait and the two-person layout the other MagicID examples use
  (scripts/make_demo_images.py: LFW face 2 on a margin; the astronaut's head and that face side by side);
- group_trio.png, group_duo.png, group_quartet.png: group pictures composed here from skimage.data.lfw_subset() faces
  (LFW, 25 x 25 grey crops, upscaled), each on a simple drawn body (neck, torso, arms), the second picture with one
  person near and one far (a small face), the last with four people.

There is no pose model here, so no skeleton comes from one. Body points are where this script draws them: neck,
shoulders, elbows, wrists and hips of the drawn bodies (points off the picture are missing, 0, 0, 0, as DWPose writes
them); for the astronaut they were placed by hand on the photo (her left arm is hidden by the helmet: missing). Head
points (nose, eyes, ears) come from dlib's 68 face landmarks of each face in the final picture (nose tip 30, eye
centres 36-41 / 42-47, jaw ends 0 / 16 for the ears), found by the pack's offline face back-end. Photos without a
body (the reference portrait, the layout) get head points and, for the layout's astronaut, the neck and shoulders
visible in her tile.

    python scripts/make_magicid_photos.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
from skimage import data

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from magic_core import face_backends as fb  # noqa: E402
from magic_core import face_search as fs  # noqa: E402
from magic_core.faces import IBUG68_LEFT_EYE, IBUG68_RIGHT_EYE  # noqa: E402

OUT = REPO / "example_workflows" / "magic_portrait_magicid_photos"
EXAMPLES = REPO / "example_workflows"
JPEG_QUALITY = 92
PNG_COMPRESSION = 9
# COCO 18 indices
NOSE, NECK, R_SHOULDER, R_ELBOW, R_WRIST, L_SHOULDER, L_ELBOW, L_WRIST = 0, 1, 2, 3, 4, 5, 6, 7
R_HIP, R_KNEE, R_ANKLE, L_HIP, L_KNEE, L_ANKLE, R_EYE, L_EYE, R_EAR, L_EAR = 8, 9, 10, 11, 12, 13, 14, 15, 16, 17
SHIRTS = ((70, 110, 170), (160, 70, 60), (60, 130, 90), (150, 120, 60), (110, 80, 140))  # RGB
SKIN_GREY = (176, 176, 176)

README = """MagicID photo set bundled with Magic Portrait (written by scripts/make_magicid_photos.py).

Each photo NAME.jpg / NAME.png has its skeleton beside it as NAME.json: an OpenPose frame (people[i].pose_keypoints_2d
= 18 COCO body points x, y, confidence in the photo's pixels; canvas_width / canvas_height = the photo's size), the
form DWPose / OpenPose preprocessors give. Build MagicID Dataset (the magicid_dataset example) turns the folder into a
MagicID training dataset.

Sources and licences:
- astronaut.jpg: skimage.data.astronaut(), Eileen Collins, NASA, public domain.
- reference_2.png, group_trio.png, group_duo.png, group_quartet.png, and the right person of group_layout.jpg: faces
  from skimage.data.lfw_subset(), crops of Labeled Faces in the Wild (LFW; University of Massachusetts, Amherst), a
  public research dataset of news photographs; the bodies and backgrounds are drawn by the script.
- group_layout.jpg: the astronaut's head and the LFW face 2, side by side (the pack's group-photo layout).

How the skeletons were made: no pose model was used (none is available offline). Body points are where the script
drew the bodies (neck, shoulders, elbows, wrists, hips; points outside the picture are missing, written 0, 0, 0); the
astronaut's body points were placed by hand on the photo (her left arm, hidden by the helmet, is missing). Head points
(nose, eyes, ears) come from dlib's 68 face landmarks of each face (nose tip, eye centres, jaw ends for the ears).
For your own photos, make the skeletons with a DWPose or OpenPose preprocessor (see the pack's README).

Magic Portrait copies this folder into ComfyUI's input folder when ComfyUI loads the pack and never overwrites a file
there.
"""


def lfw(index: int, side: int) -> np.ndarray:
    grey = (data.lfw_subset()[index] * 255).round().astype(np.uint8)
    return cv2.resize(grey, (side, side), interpolation=cv2.INTER_CUBIC)


def background(height: int, width: int, top=(206, 210, 214), bottom=(150, 156, 164)) -> np.ndarray:
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    rows = np.array(top, np.float64) * (1 - t) + np.array(bottom, np.float64) * t
    return np.repeat(rows, width, axis=1).round().astype(np.uint8)


class Person:
    """A drawn person: a face tile of side `face` whose top-left corner is (x, y), a neck, a torso and hanging
    arms. Body points are the drawing's own; `points()` gives the COCO-18 body (missing: 0, 0, 0)."""

    def __init__(self, lfw_index: int, x: int, y: int, face: int, shirt):
        self.lfw_index, self.x, self.y, self.face, self.shirt = lfw_index, x, y, face, shirt
        f = face
        cx = x + f / 2
        self.body = {
            NECK: (cx, y + 1.12 * f),
            R_SHOULDER: (cx - 0.85 * f, y + 1.35 * f), L_SHOULDER: (cx + 0.85 * f, y + 1.35 * f),
            R_ELBOW: (cx - 1.05 * f, y + 2.25 * f), L_ELBOW: (cx + 1.05 * f, y + 2.25 * f),
            R_WRIST: (cx - 0.95 * f, y + 3.1 * f), L_WRIST: (cx + 0.95 * f, y + 3.1 * f),
            R_HIP: (cx - 0.5 * f, y + 3.2 * f), L_HIP: (cx + 0.5 * f, y + 3.2 * f),
        }

    def draw_body(self, canvas: np.ndarray) -> None:
        f = self.face
        pt = {k: (int(round(v[0])), int(round(v[1]))) for k, v in self.body.items()}
        arm = max(4, int(0.32 * f))
        for a, b in ((R_SHOULDER, R_ELBOW), (R_ELBOW, R_WRIST), (L_SHOULDER, L_ELBOW), (L_ELBOW, L_WRIST)):
            cv2.line(canvas, pt[a], pt[b], self.shirt, arm, cv2.LINE_AA)
        for wrist in (R_WRIST, L_WRIST):
            cv2.circle(canvas, pt[wrist], max(3, int(0.16 * f)), SKIN_GREY, -1, cv2.LINE_AA)
        torso = np.array([pt[R_SHOULDER], pt[L_SHOULDER], pt[L_HIP], pt[R_HIP]], np.int32)
        cv2.fillConvexPoly(canvas, torso, self.shirt, cv2.LINE_AA)
        for shoulder in (R_SHOULDER, L_SHOULDER):
            cv2.circle(canvas, pt[shoulder], arm // 2, self.shirt, -1, cv2.LINE_AA)
        neck_w = int(0.34 * f)
        cx = int(round(self.x + f / 2))
        cv2.rectangle(canvas, (cx - neck_w // 2, int(self.y + 0.8 * f)), (cx + neck_w // 2, pt[NECK][1] + 4),
                      SKIN_GREY, -1)

    def paste_face(self, canvas: np.ndarray) -> None:
        f = self.face
        tile = np.repeat(lfw(self.lfw_index, f)[..., None], 3, axis=2).astype(np.float32)
        # a soft-edged rounded tile, so the crop's square border does not show
        alpha = np.zeros((f, f), np.float32)
        cv2.ellipse(alpha, (f // 2, f // 2), (int(f * 0.56), int(f * 0.6)), 0, 0, 360, 1.0, -1)
        alpha = cv2.GaussianBlur(alpha, (0, 0), f * 0.03)[..., None]
        region = canvas[self.y:self.y + f, self.x:self.x + f].astype(np.float32)
        canvas[self.y:self.y + f, self.x:self.x + f] = np.rint(region * (1 - alpha) + tile * alpha).astype(np.uint8)


def compose(height: int, width: int, people: list[Person]) -> np.ndarray:
    canvas = background(height, width)
    for person in people:  # bodies first, then faces on top (people further back are listed first)
        person.draw_body(canvas)
        person.paste_face(canvas)
    return canvas


def head_points(landmarks68: np.ndarray) -> dict[int, tuple[float, float]]:
    lm = landmarks68.astype(np.float64)
    return {NOSE: tuple(lm[30]), R_EYE: tuple(lm[list(IBUG68_RIGHT_EYE)].mean(axis=0)),
            L_EYE: tuple(lm[list(IBUG68_LEFT_EYE)].mean(axis=0)), R_EAR: tuple(lm[0]), L_EAR: tuple(lm[16])}


def body_list(points: dict[int, tuple[float, float]], height: int, width: int) -> list[float]:
    out = []
    for i in range(18):
        if i in points and 0 <= points[i][0] < width and 0 <= points[i][1] < height:
            out += [round(float(points[i][0]), 2), round(float(points[i][1]), 2), 1.0]
        else:
            out += [0.0, 0.0, 0.0]
    return out


def frame(people_points: list[dict], height: int, width: int) -> dict:
    return {"people": [{"pose_keypoints_2d": body_list(p, height, width), "face_keypoints_2d": [],
                        "hand_left_keypoints_2d": [], "hand_right_keypoints_2d": []} for p in people_points],
            "canvas_width": width, "canvas_height": height}


def faces_of(rgb: np.ndarray, expected: int, name: str):
    search = fs.find_faces(fb.DlibAnalyzer("hog"), rgb, det_size=max(rgb.shape[:2]))
    if len(search.faces) != expected:
        raise SystemExit(f"{name}: dlib found {len(search.faces)} face(s), expected {expected} ({search.notes})")
    return list(search.faces)  # left to right


def with_heads(bodies: list[dict], faces) -> list[dict]:
    """Each body (left to right) with the head points of the face nearest its neck."""
    out = []
    for body in bodies:
        neck = np.array(body.get(NECK, (np.nan, np.nan)))
        if np.isnan(neck).any():
            face = faces[len(out)]
        else:
            face = min(faces, key=lambda f: abs(f.center[0] - neck[0]) + abs(f.center[1] - neck[1]))
        out.append({**body, **head_points(face.landmarks68)})
    return out


def write(name: str, rgb: np.ndarray, people_points: list[dict]) -> None:
    height, width = rgb.shape[:2]
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if name.endswith(".jpg"):
        cv2.imwrite(str(OUT / name), bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    else:
        cv2.imwrite(str(OUT / name), bgr, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    pose = frame(people_points, height, width)
    (OUT / (Path(name).stem + ".json")).write_text(json.dumps(pose, indent=None) + "\n", encoding="utf-8")
    print(f"wrote {name} ({width}x{height}, {(OUT / name).stat().st_size // 1024} KiB) and its skeleton: "
          f"{len(people_points)} person(s)")


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    # the astronaut: body points placed by hand on the photo (x right, y down, 512 x 512)
    astronaut = data.astronaut()
    astronaut_body = {NECK: (218.0, 232.0), R_SHOULDER: (100.0, 292.0), R_ELBOW: (46.0, 430.0),
                      R_WRIST: (142.0, 494.0), L_SHOULDER: (338.0, 288.0)}
    write("astronaut.jpg", astronaut, with_heads([astronaut_body], faces_of(astronaut, 1, "astronaut")))
    # the pack's second portrait: a face crop, no body
    reference = read_rgb(EXAMPLES / "magic_portrait_reference_2.png")
    write("reference_2.png", reference, with_heads([{}], faces_of(reference, 1, "reference_2")))
    # the layout: the astronaut's head tile (resized 250x300 -> 300x360 at (54, 76)) shows her neck and shoulders
    layout = read_rgb(EXAMPLES / "magic_portrait_group_layout.png")
    sx, sy = 300 / 250, 360 / 300

    def tile(x, y):  # astronaut pixels -> layout pixels (the tile is astronaut[0:300, 100:350])
        return 54 + (x - 100) * sx, 76 + y * sy

    layout_body = {NECK: tile(*astronaut_body[NECK]), R_SHOULDER: tile(*astronaut_body[R_SHOULDER]),
                   L_SHOULDER: tile(*astronaut_body[L_SHOULDER])}
    write("group_layout.jpg", layout, with_heads([layout_body, {}], faces_of(layout, 2, "group_layout")))
    # composed group pictures
    groups = {
        "group_trio.png": (512, 768, [Person(31, 70, 110, 140, SHIRTS[0]), Person(15, 314, 90, 140, SHIRTS[1]),
                                      Person(64, 558, 120, 140, SHIRTS[2])]),
        "group_duo.png": (480, 640, [Person(41, 410, 70, 104, SHIRTS[3]), Person(52, 110, 120, 170, SHIRTS[4])]),
        "group_quartet.png": (512, 832, [Person(18, 40, 150, 124, SHIRTS[2]), Person(22, 238, 110, 124, SHIRTS[0]),
                                         Person(37, 456, 130, 124, SHIRTS[3]), Person(79, 664, 100, 124, SHIRTS[1])]),
    }
    for name, (height, width, people) in groups.items():
        rgb = compose(height, width, people)
        faces = faces_of(rgb, len(people), name)
        ordered = sorted(people, key=lambda p: p.x)
        write(name, rgb, with_heads([p.body for p in ordered], faces))
    (OUT / "README.txt").write_text(README, encoding="utf-8")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"{OUT}: {len(list(OUT.iterdir()))} files, {total // 1024} KiB")


if __name__ == "__main__":
    main()
