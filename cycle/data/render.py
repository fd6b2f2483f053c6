"""Procedural face identities: the embedded default dataset (`data=synthetic`).

Every image is a pure function of (seed, identity, index). Shapes are drawn with
analytic anti-aliasing (per-pixel coverage from an approximate signed distance),
and the pose is applied to the sampling grid, so nothing is resampled and one
112x112 image costs a few milliseconds of numpy.

Identity lives in fine detail (eyes, iris colour, brows, nose, mouth, ears, jaw,
marks, glasses, beard); the coarse look (skin tone, hair colour and style, face
width and height) comes from `num_looks` looks shared by many identities and is
perturbed per image by a colour gain. With a private coarse look per identity,
16x16 faces stay trivially separable and super-resolution has nothing to do.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os

import numpy as np

# Bump when rendering changes: it is part of the cache key.
GENERATOR_VERSION = 1

_SKIN = np.array([[0.96, 0.80, 0.69], [0.90, 0.72, 0.58], [0.80, 0.60, 0.45],
                  [0.66, 0.46, 0.33], [0.50, 0.34, 0.23], [0.36, 0.24, 0.17]], np.float32)
_HAIR = np.array([[0.08, 0.06, 0.05], [0.25, 0.16, 0.09], [0.45, 0.30, 0.16], [0.80, 0.66, 0.40],
                  [0.60, 0.25, 0.10], [0.65, 0.65, 0.65], [0.15, 0.12, 0.12]], np.float32)
_IRIS = np.array([[0.35, 0.22, 0.12], [0.20, 0.35, 0.55], [0.30, 0.45, 0.30],
                  [0.15, 0.10, 0.08], [0.45, 0.40, 0.25]], np.float32)
HAIR_STYLES = ("short", "long", "bald", "fringe")


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *key])


def look_params(seed: int, look: int) -> dict:
    """The coarse look shared by every identity that draws `look`."""
    r = _rng(seed, 0, look)
    return {
        "skin": np.clip(_SKIN[r.integers(len(_SKIN))] * r.uniform(0.93, 1.07, 3), 0, 1),
        "hair": np.clip(_HAIR[r.integers(len(_HAIR))] * r.uniform(0.85, 1.15, 3), 0, 1),
        "style": int(r.integers(len(HAIR_STYLES))),
        "face_a": r.uniform(27.0, 33.0),
        "face_b": r.uniform(35.0, 41.0),
    }


def identity_params(seed: int, identity: int, num_looks: int) -> dict:
    """Fine-detail parameters of one identity on top of its shared look."""
    r = _rng(seed, 1, identity)
    p = look_params(seed, int(r.integers(num_looks)))
    p.update(
        hairline=r.uniform(-30.0, -22.0), hair_curve=r.uniform(0.004, 0.02), parting=r.uniform(-0.25, 0.25),
        jaw_a=r.uniform(0.55, 0.85), jaw_b=r.uniform(0.35, 0.55),
        eye_dx=r.uniform(11.0, 16.0), eye_y=r.uniform(-9.0, -3.0), eye_a=r.uniform(4.5, 7.0),
        eye_b=r.uniform(2.2, 3.6), eye_tilt=r.uniform(-0.25, 0.25), iris_r=r.uniform(1.8, 2.8),
        iris=np.clip(_IRIS[r.integers(len(_IRIS))] * r.uniform(0.7, 1.3, 3), 0, 1),
        brow_dy=r.uniform(5.5, 9.5), brow_a=r.uniform(5.5, 9.0), brow_b=r.uniform(0.9, 2.2),
        brow_tilt=r.uniform(-0.35, 0.35), brow_arch=r.uniform(-0.5, 2.5), brow_dark=r.uniform(0.3, 0.8),
        nose_len=r.uniform(9.0, 17.0), nose_w=r.uniform(3.0, 6.5), nostril=r.uniform(0.9, 1.8),
        nose_dark=r.uniform(0.15, 0.4),
        mouth_y=r.uniform(15.0, 22.0), mouth_w=r.uniform(7.0, 12.5), lip_h=r.uniform(1.6, 3.2),
        lip=np.clip(np.array([0.70, 0.30, 0.30]) * r.uniform(0.7, 1.15, 3), 0, 1),
        ear_y=r.uniform(-6.0, 2.0), ear_a=r.uniform(3.5, 6.0), ear_b=r.uniform(7.0, 11.0),
        marks=r.uniform([-22, -20, 0.6], [22, 30, 1.6], size=(int(r.integers(0, 4)), 3)),
        glasses=bool(r.random() < 0.25), frame=r.uniform(0.0, 0.5, 3) * r.uniform(0.2, 1.0),
        beard=bool(r.random() < 0.2), beard_top=r.uniform(8.0, 16.0), moustache=bool(r.random() < 0.3),
    )
    return p


class _Canvas:
    """Image under construction plus the canonical face coordinates of every pixel."""

    def __init__(self, size: int, pose: tuple[float, float, float, float]):
        rot, scale, tx, ty = pose
        self.size = size
        self.s = scale * size / 112.0  # pixels per canonical unit
        self.c, self.sn = math.cos(rot), math.sin(rot)
        self.ox, self.oy = size / 2 + tx, size * 0.48 + ty
        pix = np.arange(size, dtype=np.float32) + 0.5
        px, py = pix[None, :] - self.ox, pix[:, None] - self.oy
        self.qx = (self.c * px + self.sn * py) / self.s
        self.qy = (-self.sn * px + self.c * py) / self.s
        self.img = np.empty((size, size, 3), np.float32)

    def box(self, cx: float, cy: float, extent: float):
        """Pixel slices that contain a primitive of canonical radius `extent` around (cx, cy)."""
        x = self.ox + self.s * (self.c * cx - self.sn * cy)
        y = self.oy + self.s * (self.sn * cx + self.c * cy)
        e = self.s * extent + 2.0
        x0, x1 = max(int(x - e), 0), min(int(x + e) + 1, self.size)
        y0, y1 = max(int(y - e), 0), min(int(y + e) + 1, self.size)
        if x0 >= x1 or y0 >= y1:
            return None
        return slice(y0, y1), slice(x0, x1)

    def ellipse(self, cx, cy, a, b, tilt=0.0, bend=0.0, box=None):
        """Coverage in [0, 1] of a (tilted, optionally bent) ellipse, anti-aliased."""
        box = box or self.box(cx, cy, max(a, b) + abs(bend) * a * a)
        if box is None:
            return None, None
        dx, dy = self.qx[box] - cx, self.qy[box] - cy
        if tilt:
            c, s = math.cos(tilt), math.sin(tilt)
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        if bend:  # parabolic bend: positive raises the ends (a smile, an arched brow)
            dy = dy + bend * dx * dx
        u, v = dx / a, dy / b
        g = np.sqrt(u * u + v * v)
        grad = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        d = (g - 1.0) * g / np.maximum(grad, 1e-6)  # canonical units; exact on the boundary
        return np.clip(0.5 - d * self.s, 0.0, 1.0), box

    def halfplane(self, box, y0, curve=0.0, tilt=0.0):
        """Coverage of {qy > y0 + curve*qx^2 + tilt*qx} (positive = below the curve)."""
        qx = self.qx[box]
        return np.clip(0.5 + (self.qy[box] - (y0 + curve * qx * qx + tilt * qx)) * self.s, 0.0, 1.0)

    def paint(self, cov, box, color, alpha=1.0):
        if cov is None:
            return
        if alpha != 1.0:
            cov = cov * alpha
        sub = self.img[box]
        sub += cov[..., None] * (np.asarray(color, np.float32) - sub)


def image_params(seed: int, identity: int, index: int, pose_jitter: float = 1.0) -> dict:
    """Per-image nuisance: pose, expression, illumination, background, sensor noise.
    `pose_jitter` scales the pose (0 = perfectly aligned faces) without changing any other draw."""
    r = _rng(seed, 2, identity, index)
    rot, scale, tx, ty = r.uniform(-0.14, 0.14), r.uniform(-0.08, 0.08), r.uniform(-4, 4), r.uniform(-4, 4)
    j = float(pose_jitter)
    return {
        "pose": (rot * j, 1.0 + scale * j, tx * j, ty * j),
        "yaw": r.uniform(-2.5, 2.5) * j, "smile": r.uniform(-0.01, 0.03),
        "open": max(0.0, r.uniform(-1.0, 1.5)),
        "brow_up": r.uniform(-1.0, 1.8), "lid": r.uniform(0.0, 0.45), "gaze": r.uniform(-1.2, 1.2, 2),
        "gain": r.uniform(0.88, 1.12, 3), "ambient": r.uniform(0.8, 1.15), "light": r.uniform(-0.35, 0.35, 2),
        "bg": r.uniform(0.05, 0.95, 3), "bg2": r.uniform(0.05, 0.95, 3), "bg_dir": r.uniform(-1, 1, 2),
        "cloth": r.uniform(0.05, 0.9, 3), "blob": r.uniform([-50, -50, 8, 0.1], [50, 50, 30, 0.5]),
        "noise": r.uniform(0.004, 0.025), "noise_seed": int(r.integers(2**31)),
    }


def render_face(seed: int, identity: int, index: int, num_looks: int = 16, size: int = 112,
                pose_jitter: float = 1.0, ident: dict | None = None) -> np.ndarray:
    """One face image, uint8 (size, size, 3), a pure function of its arguments."""
    p = ident if ident is not None else identity_params(seed, identity, num_looks)
    q = image_params(seed, identity, index, pose_jitter)
    cv = _Canvas(size, q["pose"])

    # Background: a linear gradient between two colours plus one soft blob.
    t = np.clip(0.5 + (q["bg_dir"][0] * cv.qx + q["bg_dir"][1] * cv.qy) / 112.0, 0, 1)[..., None]
    cv.img[:] = q["bg"] * (1 - t) + q["bg2"] * t
    bx, by, br, ba = q["blob"]
    cv.paint(*cv.ellipse(bx, by, br, br * 0.8), q["bg2"] * 0.6 + 0.2, ba)

    skin, hair, fa, fb = p["skin"], p["hair"], p["face_a"], p["face_b"]
    style = HAIR_STYLES[p["style"]]
    cv.paint(*cv.ellipse(0, fb + 30, fa * 1.9, 22), q["cloth"])  # shoulders
    cv.paint(*cv.ellipse(0, fb * 0.8, fa * 0.5, 18), skin * 0.85)  # neck
    if style == "long":
        cv.paint(*cv.ellipse(0, 4, fa + 8, fb + 16), hair)
    for side in (-1, 1):  # ears, identity-sized, behind the face outline
        ex = side * (fa - 1.5)
        cv.paint(*cv.ellipse(ex, p["ear_y"], p["ear_a"], p["ear_b"]), skin * 0.92)
        inner = cv.ellipse(ex + side * 0.8, p["ear_y"], p["ear_a"] * 0.45, p["ear_b"] * 0.6)
        cv.paint(*inner, skin * 0.7, 0.8)

    # Face: an upper ellipse united with an identity-shaped jaw.
    upper, fbox = cv.ellipse(0, 0, fa, fb)
    jaw, _ = cv.ellipse(0, fb * 0.35, fa * p["jaw_a"] + 6, fb * (0.45 + p["jaw_b"]), box=fbox)
    face = np.maximum(upper, jaw * cv.halfplane(fbox, 0.0))
    cv.paint(face, fbox, skin)
    if p["beard"]:
        cv.paint(face * cv.halfplane(fbox, p["beard_top"], 0.01), fbox, hair * 0.9, 0.85)

    # Hair on top: a cap clipped by the identity's hairline.
    if style != "bald":
        cap, hbox = cv.ellipse(0, -3, fa + 3, fb + 3)
        drop = 10.0 if style == "fringe" else 0.0
        line = 1.0 - cv.halfplane(hbox, p["hairline"] + drop, p["hair_curve"], p["parting"])
        cv.paint(cap * line, hbox, hair)
    else:
        cv.paint(*cv.ellipse(0, -fb + 6, fa * 0.8, 8), hair, 0.35)  # stubble

    yaw = q["yaw"]  # inner features slide sideways: a cheap out-of-plane turn
    for side in (-1, 1):
        ex, ey = side * p["eye_dx"] + yaw, p["eye_y"]
        tilt = side * p["eye_tilt"]
        cv.paint(*cv.ellipse(ex, ey, p["eye_a"], p["eye_b"], tilt), (0.95, 0.95, 0.93))
        gx, gy = ex + q["gaze"][0], ey + q["gaze"][1] * 0.5
        cv.paint(*cv.ellipse(gx, gy, p["iris_r"], p["iris_r"]), p["iris"])
        cv.paint(*cv.ellipse(gx, gy, p["iris_r"] * 0.45, p["iris_r"] * 0.45), (0.03, 0.03, 0.03))
        lid = q["lid"] * p["eye_b"] * 2
        upper_lid = cv.ellipse(ex, ey - 2 * p["eye_b"] + lid, p["eye_a"] * 1.1, p["eye_b"] * 1.2, tilt)
        cv.paint(*upper_lid, skin * 0.93)
        by_ = ey - p["brow_dy"] - q["brow_up"]
        cv.paint(*cv.ellipse(ex + side * 1.0, by_, p["brow_a"], p["brow_b"], side * p["brow_tilt"],
                             p["brow_arch"] / p["brow_a"] ** 2), hair * p["brow_dark"], 0.95)
        if p["glasses"]:
            ring, gbox = cv.ellipse(ex, ey, p["eye_a"] + 3.5, p["eye_b"] + 4.5)
            inner, _ = cv.ellipse(ex, ey, p["eye_a"] + 2.5, p["eye_b"] + 3.5, box=gbox)
            cv.paint(ring * (1 - inner), gbox, p["frame"])
    if p["glasses"]:
        cv.paint(*cv.ellipse(yaw, p["eye_y"] - 1, p["eye_dx"] - p["eye_a"] - 3, 0.7), p["frame"])

    # Nose: a shaded ridge, a tip and two nostrils.
    ny0, nl, nw = p["eye_y"] + 2, p["nose_len"], p["nose_w"]
    nx = yaw * 1.3
    cv.paint(*cv.ellipse(nx + 1.5, ny0 + nl / 2, 1.2, nl / 2), skin * (1 - p["nose_dark"]), 0.7)
    cv.paint(*cv.ellipse(nx, ny0 + nl, nw, nw * 0.55), skin * (1 - p["nose_dark"] * 0.6))
    for side in (-1, 1):
        cv.paint(*cv.ellipse(nx + side * nw * 0.55, ny0 + nl + 1.0, p["nostril"] * 1.3, p["nostril"]),
                 skin * 0.35)

    # Mouth: lips in bent coordinates (smile), a dark opening with the expression.
    my, mw, lh = p["mouth_y"] + p["eye_y"] + 6, p["mouth_w"], p["lip_h"]
    mx, bend = yaw * 1.1, -q["smile"]
    if p["moustache"]:
        cv.paint(*cv.ellipse(mx, my - lh - 2.0, mw * 0.9, 1.8, 0, bend), hair * 0.9, 0.9)
    cv.paint(*cv.ellipse(mx, my, mw, lh + q["open"] * 0.5, 0, bend), p["lip"])
    cv.paint(*cv.ellipse(mx, my, mw * 0.85, 0.45 + q["open"], 0, bend), (0.18, 0.05, 0.05))
    for mxy in p["marks"]:
        cv.paint(*cv.ellipse(mxy[0], mxy[1], mxy[2], mxy[2]), skin * 0.45, 0.9)

    # Illumination (directional gradient, ambient level, colour gain) and sensor noise.
    light = q["ambient"] * (1.0 + (q["light"][0] * cv.qx + q["light"][1] * cv.qy) / 56.0)
    img = cv.img * (light[..., None] * q["gain"]).astype(np.float32)
    noise = np.random.default_rng(q["noise_seed"]).standard_normal(img.shape, dtype=np.float32)
    img += noise * q["noise"]
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _render_chunk(args) -> np.ndarray:
    seed, jobs, num_looks, size, pose_jitter = args
    out = np.empty((len(jobs), size, size, 3), np.uint8)
    cache: dict[int, dict] = {}
    for k, (ident, idx) in enumerate(jobs):
        if ident not in cache:
            cache[ident] = identity_params(seed, ident, num_looks)
        out[k] = render_face(seed, ident, idx, num_looks, size, pose_jitter, ident=cache[ident])
    return out


def render_many(jobs: list[tuple[int, int]], *, seed: int, num_looks: int, size: int = 112,
                pose_jitter: float = 1.0, out: np.ndarray | None = None,
                workers: int | None = None) -> np.ndarray:
    """Render (identity, index) pairs into `out` (e.g. a memory map), in parallel across processes.

    The result does not depend on `workers`. Small jobs stay in-process: starting
    processes costs more than it saves below a few hundred images.
    """
    if out is None:
        out = np.empty((len(jobs), size, size, 3), np.uint8)
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) // 200 or 1))
    chunk = 64
    tasks = [(seed, jobs[i:i + chunk], num_looks, size, pose_jitter) for i in range(0, len(jobs), chunk)]
    if workers == 1:
        results = map(_render_chunk, tasks)
        pool = None
    else:
        # fork (as torch's DataLoader on Linux): children only run numpy, and unlike spawn/forkserver
        # it does not re-import the caller's __main__, which breaks unguarded scripts and notebooks.
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers)
        results = pool.imap(_render_chunk, tasks)
    try:
        for i, block in enumerate(results):
            out[i * chunk:i * chunk + len(block)] = block
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return out
