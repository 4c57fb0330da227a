"""Tiny stand-ins for insightface model packs (antelopev2 / buffalo_l), for tests and smoke runs without downloads.

**These are not face models.** Their outputs carry no real meaning: the "identity embedding" is a seeded random
projection of a coarse colour layout, the "landmarks" are a fixed face-shaped template nudged by the image, the
"gender/age" are a random function of the crop. What they do have is the real packs' file names and input/output
signatures, so insightface's own loader routes each file to the right task (``model_zoo`` ``ModelRouter``: a graph
with >= 5 outputs is the SCRFD-style detector (class ``SCRFD`` in 2.x, ``RetinaFace`` in 0.7.3: the same
decoding); a 192x192 input is a ``Landmark`` model, 212 outputs = ``landmark_2d_106``,
3309 = ``landmark_3d_68``; 96x96 is an ``Attribute`` model with 3 outputs = ``genderage``; 112x112 is
``ArcFaceONNX``), in insightface 0.7.3 as in 2.x, and every downstream step runs on real images.

`write_tiny_insightface_pack(folder, seed=0, layout="antelopev2")` writes the five files (a few to ~100 KB each,
opset 13, IR version 7, so any onnxruntime 1.x loads them) in well under a second. Same seed, same bytes.

The detector is designed rather than random, so detection depends on the image the way a test needs it to:

- Input ``[1, 3, height, width]`` (named dynamic dims), the blob SCRFD feeds it: RGB, ``(pixel - 127.5) / 128``.
- A per-pixel *skin tone* map: ``clip(4 * min(R - G, G - B, 0.6 - (R - G), R - 0.2), 0, 1)``: warm, not too
  saturated, not dark (black, white, grey and greyscale images have none).
- Nine outputs in SCRFD's order (scores for strides 8/16/32, then boxes, then keypoints; two anchors per location,
  rows ordered (y, x, anchor), scores ``[N, 1]``, box distances ``[N, 4]`` and keypoint offsets ``[N, 10]`` in
  stride units). Each of the six (stride, anchor) pairs looks for a blob of one size
  ``FACE_SIZES = (32, 48, 72, 108, 160, 240)`` px (x1.5 steps): its score is
  ``sigmoid(GAIN * (centre - LAMBDA * ring) + BIAS)`` with ``centre`` the mean skin tone in an S x S window around
  the anchor and ``ring`` the mean in the band between that window and one twice its size. A skin-toned blob of
  about S px on a non-skin surround scores high; a window inside a larger skin area (ring also skin) or on a
  smaller one scores low, so each face fires at about one size, and a face much larger than 240 px in the
  detector's input (a close-up at det size 640) is missed, as real SCRFD misses faces larger than its anchors:
  retrying at a smaller det size finds it.
- Its smallest blob, 32 px, is written into the file's ONNX metadata as ``min_face_px`` (a detector may state its
  floor there; real SCRFD files do not, and the pack assumes SCRFD's smallest anchor, 16 px).
- Boxes are S wide and 1.15 S tall, centred on the skin-tone centroid of the 2S x 2S window around the anchor (so
  the anchors around one face agree and non-maximum suppression keeps one box); the 5 keypoints are a face template (eyes, nose tip,
  mouth corners, insightface's order) placed in that box, jittered a little by the seed.

The landmark models output the same face template (68 iBUG-ordered points; 106 points in a plausible face layout,
NOT the real 2d106det order) in the crop insightface gives them, plus a small seeded linear function of a 4x4
colour layout of the crop. The recognition model maps a mean-removed 4x4 colour layout of the aligned 112x112 crop
through a seeded random 48 x 512 matrix: different face crops give different embeddings, the same crop the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OPSET = 13
IR_VERSION = 7

LAYOUTS: dict[str, dict[str, str]] = {
    "antelopev2": {
        "detection": "scrfd_10g_bnkps.onnx",
        "landmark_2d_106": "2d106det.onnx",
        "landmark_3d_68": "1k3d68.onnx",
        "genderage": "genderage.onnx",
        "recognition": "glintr100.onnx",
    },
    "buffalo_l": {
        "detection": "det_10g.onnx",
        "landmark_2d_106": "2d106det.onnx",
        "landmark_3d_68": "1k3d68.onnx",
        "genderage": "genderage.onnx",
        "recognition": "w600k_r50.onnx",
    },
}

STRIDES = (8, 16, 32)
FACE_SIZES = (32, 48, 72, 108, 160, 240)  # px in the detector input, per (stride, anchor); multiples of 4
BOX_ASPECT = 1.15  # box height / width
SKIN_CAP = 0.6  # R - G above this is too saturated to be skin (orange suits, red flags)
SKIN_MIN_RED = 0.2  # normalised red below this is too dark
GAIN = 20.0
LAMBDA = 2.0
BIAS = -5.0


# ---------------------------------------------------------------------------------------------------------- templates


def face_template_68() -> np.ndarray:
    """iBUG-68-ordered points of a frontal face, in box units: x right, y down, box centre at (0, 0), box width 1."""
    pts = np.zeros((68, 2), dtype=np.float64)
    phi = np.pi * (1 - np.arange(17) / 16)  # jaw: ear (image left) -> chin -> ear
    pts[0:17] = np.stack([0.46 * np.cos(phi), -0.12 + 0.62 * np.sin(phi)], axis=1)
    brow = np.linspace(0, 1, 5)
    pts[17:22] = np.stack([-0.38 + 0.3 * brow, -0.24 - 0.05 * np.sin(np.pi * brow)], axis=1)
    pts[22:27] = np.stack([0.08 + 0.3 * brow, -0.24 - 0.05 * np.sin(np.pi * brow)], axis=1)
    pts[27:31] = np.stack([np.zeros(4), np.linspace(-0.13, 0.09, 4)], axis=1)
    pts[31:36] = np.stack([np.linspace(-0.09, 0.09, 5), 0.15 + 0.025 * np.sin(np.pi * np.linspace(0, 1, 5))], axis=1)

    def ring(cx, cy, rx, ry, angles):
        a = np.radians(np.asarray(angles, dtype=np.float64))
        return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], axis=1)

    eye = [180, 240, 300, 0, 60, 120]  # outer/left corner, top, top, right corner, bottom, bottom
    pts[36:42] = ring(-0.19, -0.11, 0.08, 0.03, eye)
    pts[42:48] = ring(0.19, -0.11, 0.08, 0.03, [180, 240, 300, 0, 60, 120])
    pts[48:60] = ring(0.0, 0.29, 0.17, 0.07, np.linspace(180, 180 + 360, 12, endpoint=False))
    pts[60:68] = ring(0.0, 0.29, 0.11, 0.025, np.linspace(180, 180 + 360, 8, endpoint=False))
    return pts


def face_template_106() -> np.ndarray:
    """106 points in a plausible face layout (contour 33, brows 18, eyes 20, nose 15, mouth 20), in box units.
    Not the real 2d106det point order."""
    phi = np.pi * (1 - np.arange(33) / 32)
    contour = np.stack([0.46 * np.cos(phi), -0.12 + 0.62 * np.sin(phi)], axis=1)
    b = np.linspace(0, 1, 9)
    brows = np.concatenate([np.stack([-0.38 + 0.3 * b, -0.24 - 0.05 * np.sin(np.pi * b)], axis=1),
                            np.stack([0.08 + 0.3 * b, -0.24 - 0.05 * np.sin(np.pi * b)], axis=1)])
    a = np.radians(np.linspace(0, 360, 9, endpoint=False))
    eyes = []
    for cx in (-0.19, 0.19):
        eyes.append(np.stack([cx + 0.08 * np.cos(a), -0.11 + 0.03 * np.sin(a)], axis=1))
        eyes.append(np.array([[cx, -0.11]]))
    nose = np.concatenate([np.stack([np.zeros(7), np.linspace(-0.13, 0.12, 7)], axis=1),
                           np.stack([np.linspace(-0.1, 0.1, 8), np.full(8, 0.16)], axis=1)])
    m = np.radians(np.linspace(0, 360, 20, endpoint=False))
    mouth = np.stack([0.17 * np.cos(m), 0.29 + 0.07 * np.sin(m)], axis=1)
    return np.concatenate([contour, brows, *eyes, nose, mouth])  # 33 + 18 + 20 + 15 + 20 = 106


def kps_template() -> np.ndarray:
    """The 5 keypoints (insightface order) of `face_template_68`, in box units."""
    t = face_template_68()
    return np.stack([t[36:42].mean(0), t[42:48].mean(0), t[30], t[48], t[54]])


# -------------------------------------------------------------------------------------------------------- onnx helpers


class _Graph:
    def __init__(self, name: str):
        self.name = name
        self.nodes = []
        self.inits = []
        self._n = 0

    def const(self, value, name: str | None = None) -> str:
        from onnx import numpy_helper

        self._n += 1
        name = name or f"tiny_c{self._n}"
        arr = np.asarray(value)
        self.inits.append(numpy_helper.from_array(arr if arr.dtype == np.int64 else arr.astype(np.float32), name))
        return name

    def op(self, op_type: str, inputs, n_out: int = 1, out=None, **attrs):
        from onnx import helper

        self._n += 1
        if out is None:
            outs = [f"tiny_t{self._n}_{i}" for i in range(n_out)]
        else:
            outs = [out] if isinstance(out, str) else list(out)
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"tiny_{op_type.lower()}_{self._n}",
                                           **attrs))
        return outs[0] if len(outs) == 1 else outs

    def model(self, inputs, outputs):
        from onnx import helper

        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="magic-portrait tiny_insightface", producer_version="1")
        model.ir_version = IR_VERSION
        model.doc_string = "Tiny stand-in written by magic_portrait.tiny_insightface: outputs carry no real meaning."
        return model


def _tensor(name, shape):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _window(k: int, stride_cells: int) -> tuple[list[int], list[int]]:
    """Pads and strides for a k x k window (in 4-px cells) centred on every anchor of a stride (`stride_cells` cells)."""
    begin = k // 2
    end = max(k - stride_cells - begin, 0)
    return [begin, begin, end, end], [stride_cells, stride_cells]


# ----------------------------------------------------------------------------------------------------------- models


def build_detector(seed: int = 0):
    """The SCRFD-signature detector (module docstring)."""
    rng = np.random.default_rng([seed, 1])
    g = _Graph("tiny_scrfd")
    x = "input.1"
    r, gr, b = g.op("Split", [x], n_out=3, axis=1)
    r_g = g.op("Sub", [r, gr])
    g_b = g.op("Sub", [gr, b])
    cap = g.op("Sub", [g.const(np.full((1, 1, 1, 1), SKIN_CAP)), r_g])
    bright = g.op("Sub", [r, g.const(np.full((1, 1, 1, 1), SKIN_MIN_RED))])
    m = g.op("Min", [r_g, g_b, cap, bright])
    skin = g.op("Clip", [g.op("Mul", [m, g.const(np.full((1, 1, 1, 1), 4.0))]), g.const(0.0), g.const(1.0)])
    p4 = g.op("AveragePool", [skin], kernel_shape=[4, 4], strides=[4, 4])  # 4-px cells

    kps_t = kps_template() + rng.normal(0, 0.01, (5, 2))
    eps = g.const(np.full((1, 1, 1, 1), 1e-3))
    scores, boxes, kpss = [], [], []
    for level, stride in enumerate(STRIDES):
        cells = stride // 4
        per_anchor_score, per_anchor_box, per_anchor_kps = [], [], []
        for a in range(2):
            size = FACE_SIZES[2 * level + a]
            k = size // 4
            # centre: mean skin tone in the S x S window around the anchor
            pads, strides = _window(k, cells)
            centre = g.op("AveragePool", [p4], kernel_shape=[k, k], pads=pads, strides=strides, count_include_pad=1)
            # the 2S x 2S window: mean skin tone and its first moments (mean pixel offset from the anchor, weighted
            # by skin tone), as two separable passes (rows, then columns)
            kk = 2 * k
            off = 4.0 * (np.arange(kk) - kk // 2) + 1.5  # cell centre - anchor, px (cell j spans 4j..4j+4)
            row_w = np.stack([np.ones(kk), off, np.ones(kk)]).reshape(3, 1, 1, kk)
            col_w = np.stack([np.ones(kk), np.ones(kk), off]).reshape(3, 1, kk, 1) / (kk * kk)
            pads2, _ = _window(kk, cells)
            rows = g.op("Conv", [p4, g.const(row_w)], kernel_shape=[1, kk], pads=[0, pads2[1], 0, pads2[3]],
                        strides=[1, cells])
            moments = g.op("Conv", [rows, g.const(col_w)], kernel_shape=[kk, 1], pads=[pads2[0], 0, pads2[2], 0],
                           strides=[cells, 1], group=3)
            big, mx, my = g.op("Split", [moments], n_out=3, axis=1)
            # score = sigmoid(GAIN * (centre - LAMBDA * ring) + BIAS), ring = (4 * big - centre) / 3
            wc = GAIN * (1 + LAMBDA / 3)
            wb = -GAIN * LAMBDA * 4 / 3
            lin = g.op("Conv", [g.op("Concat", [centre, big], axis=1), g.const(np.array([wc, wb]).reshape(1, 2, 1, 1)),
                                g.const(np.array([BIAS]))], kernel_shape=[1, 1])
            per_anchor_score.append(g.op("Sigmoid", [lin]))
            # skin centroid offset (px) inside the 2S window
            denom = g.op("Add", [big, eps])
            dxy = g.op("Concat", [g.op("Div", [mx, denom]), g.op("Div", [my, denom])], axis=1)
            half_w, half_h = size / 2, size * BOX_ASPECT / 2
            wbox = np.array([[-1, 0], [0, -1], [1, 0], [0, 1]], dtype=np.float32) / stride
            bbias = np.array([half_w, half_h, half_w, half_h], dtype=np.float32) / stride
            per_anchor_box.append(g.op("Conv", [dxy, g.const(wbox.reshape(4, 2, 1, 1)), g.const(bbias)],
                                       kernel_shape=[1, 1]))
            wk = np.tile(np.eye(2, dtype=np.float32), (5, 1)) / stride
            kbias = (kps_t * np.array([size, size * BOX_ASPECT])).reshape(-1).astype(np.float32) / stride
            per_anchor_kps.append(g.op("Conv", [dxy, g.const(wk.reshape(10, 2, 1, 1)), g.const(kbias)],
                                       kernel_shape=[1, 1]))
        for group, width, out in ((per_anchor_score, 1, scores), (per_anchor_box, 4, boxes),
                                  (per_anchor_kps, 10, kpss)):
            both = g.op("Concat", group, axis=1)  # [1, 2 * width, h, w]: channel = anchor * width + j
            nhwc = g.op("Transpose", [both], perm=[0, 2, 3, 1])
            out.append((nhwc, width, stride))
    outputs = []
    for kind, group in (("score", scores), ("bbox", boxes), ("kps", kpss)):
        for nhwc, width, stride in group:
            name = f"{kind}_{stride}"
            g.op("Reshape", [nhwc, g.const(np.array([-1, width], dtype=np.int64))], out=name)
            outputs.append(_tensor(name, [f"n{stride}", width]))
    model = g.model([_tensor("input.1", [1, 3, "height", "width"])], outputs)
    from onnx import helper

    helper.set_model_props(model, {"min_face_px": str(FACE_SIZES[0])})
    return model


def _layout_features(g: _Graph, x: str, size: int, cells: int = 4) -> str:
    """[B, 3 * cells * cells] mean colour of a cells x cells grid, with the crop's mean removed."""
    k = size // cells
    pooled = g.op("AveragePool", [x], kernel_shape=[k, k], strides=[k, k])
    centred = g.op("Sub", [pooled, g.op("ReduceMean", [pooled], axes=[1, 2, 3], keepdims=1)])
    return g.op("Flatten", [centred], axis=1)


def build_landmark(points: int, seed: int = 0):
    """192x192 input, one output: [B, 212] (106 x 2) or [B, 3309] (1103 x 3, the last 68 rows are the points)."""
    rng = np.random.default_rng([seed, 2, points])
    g = _Graph(f"tiny_landmark_{points}")
    feats = _layout_features(g, "data", 192)
    # insightface crops 1.5 x the box's longer side to 192 px and maps [-1, 1] outputs to the crop
    if points == 106:
        base = face_template_106() * (2 / 1.5)
        flat = base.reshape(-1)
        n_out = 212
    else:
        t = face_template_68() * (2 / 1.5)
        z = 0.3 * np.exp(-(t[:, 0] ** 2 + (t[:, 1] - 0.1) ** 2) / 0.03) - 0.2 * t[:, 0] ** 2
        rows = np.zeros((1103, 3))
        rows[-68:, :2] = t
        rows[-68:, 2] = z
        flat = rows.reshape(-1)
        n_out = 3309
    n_var = 212 if points == 106 else 68 * 3  # only the rows insightface reads depend on the image
    w = rng.normal(0, 0.004, (48, n_var))
    out = "fc1"
    if n_var == n_out:
        g.op("Gemm", [feats, g.const(w), g.const(flat)], out=out)
    else:
        pts = g.op("Gemm", [feats, g.const(w), g.const(flat[-n_var:])])
        g.op("Pad", [pts, g.const(np.array([0, n_out - n_var, 0, 0], dtype=np.int64))], out=out)
    return g.model([_tensor("data", ["batch", 3, 192, 192])], [_tensor(out, ["batch", n_out])])


def build_genderage(seed: int = 0):
    """96x96 input, output [B, 3]: two gender scores and age / 100."""
    rng = np.random.default_rng([seed, 3])
    g = _Graph("tiny_genderage")
    feats = _layout_features(g, "data", 96)
    lin = g.op("Gemm", [feats, g.const(rng.normal(0, 0.3, (48, 3))), g.const(np.array([0.0, 0.0, -0.85]))])
    g.op("Sigmoid", [lin], out="fc1")
    return g.model([_tensor("data", ["batch", 3, 96, 96])], [_tensor("fc1", ["batch", 3])])


def build_recognition(seed: int = 0, dim: int = 512):
    """112x112 input, output [B, dim]: a seeded random projection of the crop's colour layout (not normalised)."""
    rng = np.random.default_rng([seed, 4])
    g = _Graph("tiny_arcface")
    feats = _layout_features(g, "input.1", 112)
    g.op("Gemm", [feats, g.const(rng.normal(0, 1 / np.sqrt(48), (48, dim))), g.const(rng.normal(0, 0.01, dim))],
         out="683")
    return g.model([_tensor("input.1", ["batch", 3, 112, 112])], [_tensor("683", ["batch", dim])])


def write_tiny_insightface_pack(folder, *, seed: int = 0, layout: str = "antelopev2") -> Path:
    """Write the five tiny stand-in files of `layout` ("antelopev2" or "buffalo_l") into `folder` (created if
    needed; e.g. ``.../models/insightface/models/antelopev2``) and return the folder. Deterministic in `seed`."""
    import onnx

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = LAYOUTS[layout]
    models = {
        "detection": build_detector(seed),
        "landmark_2d_106": build_landmark(106, seed),
        "landmark_3d_68": build_landmark(68, seed),
        "genderage": build_genderage(seed),
        "recognition": build_recognition(seed),
    }
    for task, model in models.items():
        onnx.save_model(model, str(folder / files[task]))
    return folder
