"""Face detection benchmark, measured side by side in one run (run by hand: python bench/bench_faces.py).

Time per picture of Detect Faces at its defaults (min_face 48 px, det_size 640, score 0.5, retries on) against the
old defaults (the picture's long side scaled to det_size 640 whatever the faces; insightface at a square 640 x 640
input), on group pictures of real faces (magic_portrait.group_photos) of 512, 1024 and 2048 px with faces from 60 px
to about a third of the picture, one cut by the border. Back-ends: dlib HOG (LFW people and the astronaut) and
insightface's own code on the tiny stand-in pack (the astronaut's head: it detects skin-toned blobs; its timings are
those of a tiny network, not SCRFD's). "detect" is the search (every pass), "total" adds landmarks and the embedding
of every face found (what the node does per picture). --repeats interleaved rounds, the best time kept.

Goal: every face found at defaults, at most 2x the old default's time on a 1024 px picture.

A second table: the share of the picture DIIR's paste masks touch, with the old Gaussian feather (sigma 0.06 of the
face, cut at 3 sigma and at the crop square) and the new compact band (grow 0.1 + band 0.12 of the face).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from magic_core import diir, face_crop  # noqa: E402
from magic_core import face_backends as fb  # noqa: E402
from magic_core import face_masks as fm  # noqa: E402
from magic_core import face_search as fs  # noqa: E402
from magic_core import faces as fc  # noqa: E402
from magic_portrait import group_photos as gp  # noqa: E402

PICTURES = {  # long side: (width, height, face sizes px)
    512: (512, 512, [90, 60, 80, 150]),
    1024: (1024, 1024, [100, 60, 70, 90, 120, 160, 220, 300]),
    2048: (2048, 2048, [120, 60, 80, 110, 150, 200, 300, 450, 600]),
}


def old_default(analyzer: fb.FaceAnalyzer, rgb: np.ndarray) -> tuple[list[fc.Face], float]:
    """Detect Faces before issue #19, at its defaults: one detection with the long side at det_size 640 (insightface
    at a square 640 x 640 input), every hit described. (Its retries ran only when nothing was found: never here.)"""
    start = time.perf_counter()
    if isinstance(analyzer, fb.InsightFaceAnalyzer):
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        with analyzer._lock:
            analyzer._det.det_thresh = 0.5
            boxes, kpss = analyzer._det.detect(bgr, input_size=(640, 640), max_num=0)
        hits = [fb.Detection(boxes[i, :4], float(boxes[i, 4]), kpss[i]) for i in range(boxes.shape[0])]
    else:
        hits = analyzer.detect(rgb, 640 / max(rgb.shape[:2]), 0.5)
    detect = time.perf_counter() - start
    return [analyzer.describe(rgb, d) for d in hits], detect


def found_placed(faces, photo: gp.GroupPhoto, width: int, height: int) -> int:
    boxes = [f.bbox for f in faces]
    return sum(any(fs.same_face(p.clipped(width, height), b) for b in boxes) for p in photo.faces)


def bench_backend(name: str, analyzer: fb.FaceAnalyzer, people: str, repeats: int) -> list[tuple]:
    rows = []
    for long_side, (w, h, sizes) in PICTURES.items():
        photo = gp.group_photo(w, h, sizes, seed=long_side, people=people)
        old_t, new_t, old_d, new_d = [], [], [], []
        for _ in range(repeats):  # interleaved: the machine's load hits both alike
            start = time.perf_counter()
            old_faces, detect = old_default(analyzer, photo.rgb)
            old_t.append(time.perf_counter() - start)
            old_d.append(detect)
            search = fs.find_faces(analyzer, photo.rgb)
            new_t.append(search.total_seconds)
            new_d.append(search.detect_seconds)
        first = search.passes[0]
        rows.append((name, f"{w}x{h}", len(photo.faces), found_placed(old_faces, photo, w, h), min(old_d),
                     min(old_t), found_placed(search.faces, photo, w, h),
                     f"{first.size[0]}x{first.size[1]} x{first.scale:.2f}" + (f" {first.tiles}t" if first.tiles > 1
                                                                               else ""),
                     min(new_d), min(new_t)))
    return rows


def min_face_tradeoff(analyzer: fb.FaceAnalyzer, repeats: int) -> list[tuple]:
    """dlib on the 1024 px picture at other min_face values: scale, faces found, times, against the old default."""
    w, h, sizes = PICTURES[1024]
    photo = gp.group_photo(w, h, sizes, seed=1024, people="lfw")
    rows = []
    for min_face in (48, 56, 64, 80):
        old_d, new_d, new_t = [], [], []
        for _ in range(repeats):
            old_d.append(old_default(analyzer, photo.rgb)[1])
            search = fs.find_faces(analyzer, photo.rgb, min_face=min_face)
            new_d.append(search.detect_seconds)
            new_t.append(search.total_seconds)
        rows.append((min_face, search.scale, found_placed(search.faces, photo, w, h), len(photo.faces), min(new_d),
                     min(new_t), min(new_d) / min(old_d)))
    return rows


def paste_coverage() -> list[tuple]:
    rows = []
    analyzer = fb.DlibAnalyzer("hog")
    for w, h, sizes, seed in ((701, 451, [110, 60, 90, 140], 3), (1024, 1024, [100, 60, 70, 90, 120, 160, 220, 300],
                                                                   1024)):
        photo = gp.group_photo(w, h, sizes, seed=seed)
        faces = fs.find_faces(analyzer, photo.rgb).faces
        old = np.zeros((h, w), np.float32)
        new = np.zeros((h, w), np.float32)
        for face in faces:
            box = face_crop.face_square(face, 0.6)
            hull = "hull" if face.landmarks is not None else "ellipse"
            gaussian = fm.face_mask(face, h, w, shape=hull, grow=0.1 * face.size, feather=0.06 * face.size)
            inside = np.zeros_like(gaussian)
            inside[max(0, box.top):max(0, min(h, box.bottom)), max(0, box.left):max(0, min(w, box.right))] = 1
            old = np.maximum(old, gaussian * inside)
            grow, band = 0.1 * face.size, 0.12 * face.size
            new_box = face_crop.face_square(face, 0.6, contain=diir.paste_extent(face, grow, band))
            new = np.maximum(new, diir.paste_mask(face, new_box, h, w, grow, band))
        rows.append((f"{w}x{h}", len(faces), 100 * float((old > 0).mean()), 100 * float((old >= 1 / 255).mean()),
                     100 * float((new > 0).mean())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-insightface", action="store_true")
    args = parser.parse_args()

    rows = bench_backend("dlib (hog)", fb.DlibAnalyzer("hog"), "lfw", args.repeats)
    if not args.skip_insightface:
        from magic_portrait.tiny_insightface import write_tiny_insightface_pack

        with tempfile.TemporaryDirectory() as folder:
            pack = write_tiny_insightface_pack(Path(folder) / "antelopev2", seed=0)
            rows += bench_backend("insightface (tiny)", fb.InsightFaceAnalyzer(pack, providers="cpu"), "astronaut",
                                  args.repeats)
    print(f"Detect Faces per picture, best of {args.repeats} interleaved rounds (s); faces found of those placed")
    head = (f"| {'back-end':<18} | {'picture':<9} | {'old: found':>10} | {'detect':>6} | {'total':>6} | "
            f"{'new: found':>10} | {'detection image':<20} | {'detect':>6} | {'total':>6} | {'detect x':>8} | "
            f"{'total x':>7} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, pic, placed, old_found, old_d, old_t, new_found, image, new_d, new_t in rows:
        print(f"| {name:<18} | {pic:<9} | {f'{old_found}/{placed}':>10} | {old_d:6.2f} | {old_t:6.2f} | "
              f"{f'{new_found}/{placed}':>10} | {image:<20} | {new_d:6.2f} | {new_t:6.2f} | {new_d / old_d:8.2f} | "
              f"{new_t / old_t:7.2f} |")
    print("\ndlib on the 1024 px picture: min_face against time (detect x: over the old default's search)")
    print("| min_face | scale | found | detect s | total s | detect x |")
    print("|----------|-------|-------|----------|---------|----------|")
    for min_face, scale, found, placed, detect, total, ratio in min_face_tradeoff(fb.DlibAnalyzer("hog"),
                                                                                   args.repeats):
        print(f"| {min_face:>8} | {scale:5.2f} | {f'{found}/{placed}':>5} | {detect:8.2f} | {total:7.2f} | "
              f"{ratio:8.2f} |")
    print("\nDIIR paste masks: share of the picture they touch (%)")
    print("| picture   | faces | old > 0 | old >= 1/255 | new > 0 |")
    print("|-----------|-------|---------|--------------|---------|")
    for pic, n, old_any, old_visible, new_any in paste_coverage():
        print(f"| {pic:<9} | {n:>5} | {old_any:7.1f} | {old_visible:12.1f} | {new_any:7.1f} |")


if __name__ == "__main__":
    main()
