"""Camera vision: speed of the verification pipeline and its accuracy on a synthetic sweep.

Run:  python benchmarks/vision.py [--frames 240] [--rounds 300] [--quick]

Everything on ONE core (``cv2.setNumThreads(1)``, BLAS/OpenMP limited to one
thread), frames from ``simulators.scene.SceneRenderer`` encoded as JPEG
(quality 85, like the camera simulator) and decoded again, so the JPEG's
artefacts are part of the measurement.

1. Speed, per frame, at 640x480 and 1280x720, measured side by side in
   interleaved rounds (raw, ours, raw, ours, ...) on the same JPEG:

   * ``raw``: ``cv2.imdecode`` + ``cv2.cvtColor(BGR2Lab)`` of the frame (what
     "just decode and convert" costs: the baseline the ratios are against), and
     ``cv2.imdecode`` alone;
   * ``verify``: the whole verification pipeline, ``decode_jpeg`` +
     ``analyse(frame, calibration, reference)`` with a prepared reference
     (vial, patch, fill in mL, colour in Lab, scene change);
   * ``analyse``: the same without the JPEG decoding;
   * ``analyse, raw ref``: with the reference passed as a plain frame (prepared on
     every call; what a caller pays that does not keep a ``Reference``).

   Goal (issue 6): >= 100 frames/s at 640x480 for ``verify``.

2. Accuracy over a sweep of ``--frames`` frames per size: a calibration is
   fitted from 7 frames of known volume (0-3 mL, lighting drifting), then
   every frame has a random volume (0.2-3.0 mL), a random mix of the
   station's three dyes, a lighting gain in 0.6-1.05 (the world's drift
   range with and without the enclosure LED, short of over-exposing the
   patch) and sensor noise 1-4 DN. Reported: the fill-level error in mL
   against the rendered volume and the colour error CIEDE2000 between the
   camera's Lab and the Lab of the liquid's true transmission (what the
   colour sensor would report, ``instruments.colour.linear_to_lab``); median, p95,
   max. Goals: fill within 5 % of the 3.0 mL vial (0.15 mL), colour median
   ΔE2000 < 2.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from instruments.colour import delta_e2000, linear_to_lab  # noqa: E402
from instruments.vision import (  # noqa: E402
    Calibration,
    analyse,
    decode_jpeg,
    fit_calibration,
    prepare_reference,
)
from simulators.scene import SceneInputs, SceneRenderer  # noqa: E402
from simulators.world import ABSORBANCE, DYES  # noqa: E402

SIZES = ((640, 480), (1280, 720))
CAPACITY_ML = 3.0
FILL_GOAL_ML = 0.05 * CAPACITY_ML
DE_GOAL = 2.0
FPS_GOAL = 100.0
JPEG_QUALITY = 85


def encode(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def transmission(fractions: Sequence[float]) -> tuple[float, float, float]:
    absorb = [
        sum(ABSORBANCE[d][c] * f for d, f in zip(DYES, fractions, strict=True)) for c in range(3)
    ]
    r, g, b = (10.0 ** (-a) for a in absorb)
    return (r, g, b)


def calibrate(renderer: SceneRenderer) -> Calibration:
    volumes = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
    gains = (0.78, 0.7, 0.9, 0.82, 0.75, 0.95, 0.8)
    trans = transmission((0.5, 0.3, 0.2))
    samples = [
        (
            decode_jpeg(
                encode(
                    renderer.render(SceneInputs(volume_ml=v, transmission=trans, lighting_gain=g))[
                        0
                    ]
                )
            ),
            v,
        )
        for v, g in zip(volumes, gains, strict=True)
    ]
    return fit_calibration(samples)


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


# ------------------------------------------------------------------- speed
@dataclass
class Timing:
    name: str
    samples: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples) * 1e3

    @property
    def p95_ms(self) -> float:
        return pct(self.samples, 95) * 1e3


def bench_speed(width: int, height: int, rounds: int) -> list[Timing]:
    renderer = SceneRenderer(width, height, seed=11, noise_sigma=2.0)
    cal = calibrate(renderer)
    trans = transmission((0.4, 0.2, 0.4))
    ref_frame = decode_jpeg(
        encode(renderer.render(SceneInputs(volume_ml=1.0, transmission=trans))[0])
    )
    reference = prepare_reference(ref_frame)
    jpegs = [
        encode(
            renderer.render(
                SceneInputs(volume_ml=1.0 + 0.1 * i, transmission=trans, lighting_gain=0.85)
            )[0]
        )
        for i in range(8)
    ]
    frames = [decode_jpeg(j) for j in jpegs]
    check = analyse(frames[0], cal, reference)
    if check.status != "ok":
        raise RuntimeError(f"benchmark scene not verifiable: {check.reasons}")

    def raw(i: int) -> object:
        img = cv2.imdecode(np.frombuffer(jpegs[i % 8], np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise RuntimeError("imdecode failed")
        return cv2.cvtColor(img, cv2.COLOR_BGR2Lab)

    def decode_only(i: int) -> object:
        return cv2.imdecode(np.frombuffer(jpegs[i % 8], np.uint8), cv2.IMREAD_COLOR)

    def verify(i: int) -> object:
        return analyse(decode_jpeg(jpegs[i % 8]), cal, reference)

    def analyse_only(i: int) -> object:
        return analyse(frames[i % 8], cal, reference)

    def analyse_raw_ref(i: int) -> object:
        return analyse(frames[i % 8], cal, ref_frame)

    cases: list[tuple[str, Callable[[int], object]]] = [
        ("raw: imdecode + cvtColor(Lab)", raw),
        ("raw: imdecode alone", decode_only),
        ("verify: decode_jpeg + analyse", verify),
        ("analyse (prepared reference)", analyse_only),
        ("analyse (reference as array)", analyse_raw_ref),
    ]
    timings = [Timing(name, []) for name, _ in cases]
    for i in range(10):  # warm-up
        for _, fn in cases:
            fn(i)
    for i in range(rounds):  # interleaved, so drift on a shared machine hits all alike
        for timing, (_, fn) in zip(timings, cases, strict=True):
            t0 = time.perf_counter()
            fn(i)
            timing.samples.append(time.perf_counter() - t0)
    return timings


# ---------------------------------------------------------------- accuracy
@dataclass
class Accuracy:
    size: str
    frames: int
    not_ok: int
    fill_err: list[float]
    de: list[float]


def bench_accuracy(width: int, height: int, n: int, seed: int) -> Accuracy:
    rng = np.random.default_rng(seed)
    renderers = {
        s: SceneRenderer(width, height, seed=seed + int(s), noise_sigma=s) for s in (1, 2, 3, 4)
    }
    cal = calibrate(renderers[2])
    fill_err: list[float] = []
    de: list[float] = []
    not_ok = 0
    for _ in range(n):
        sigma = int(rng.integers(1, 5))
        trans = transmission(rng.dirichlet((1.0, 1.0, 1.0)).tolist())
        inputs = SceneInputs(
            volume_ml=float(rng.uniform(0.2, CAPACITY_ML)),
            transmission=trans,
            lighting_gain=float(rng.uniform(0.6, 1.05)),
        )
        image, truth = renderers[sigma].render(inputs)
        a = analyse(decode_jpeg(encode(image)), cal)
        if a.status != "ok" or a.fill_ml is None or a.lab is None:
            not_ok += 1
            print(f"  not verified: {inputs} -> {a.reasons or a.notes}", file=sys.stderr)
            continue
        fill_err.append(abs(a.fill_ml - float(truth["fill_ml"])))
        de.append(delta_e2000(a.lab, linear_to_lab(truth["transmission"])))
    return Accuracy(f"{width}x{height}", n, not_ok, fill_err, de)


# -------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=240, help="sweep frames per size (240)")
    parser.add_argument("--rounds", type=int, default=300, help="timed rounds per size (300)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="CI smoke run: 40 frames, 40 rounds")
    args = parser.parse_args()
    frames, rounds = (40, 40) if args.quick else (args.frames, args.rounds)
    cv2.setNumThreads(1)
    t_start = time.perf_counter()

    print(
        f"camera vision on one core (cv2 threads: {cv2.getNumThreads()}), OpenCV {cv2.__version__}"
    )
    print()
    print(
        f"{'per-frame time':<36} {'size':>9} {'median ms':>10} {'p95 ms':>8} "
        f"{'frames/s':>9} {'x raw':>7}"
    )
    verify_fps: dict[str, float] = {}
    for w, h in SIZES:
        timings = bench_speed(w, h, rounds)
        raw = timings[0].median_ms
        for t in timings:
            fps = 1e3 / t.median_ms
            print(
                f"{t.name:<36} {w}x{h:>4} {t.median_ms:>10.3f} {t.p95_ms:>8.3f} "
                f"{fps:>9.0f} {t.median_ms / raw:>7.2f}"
            )
            if t.name.startswith("verify"):
                verify_fps[f"{w}x{h}"] = fps
    print()
    print(
        f"{'accuracy sweep':<14} {'frames':>6} {'unverif.':>8} {'fill err mL: median':>20} "
        f"{'p95':>6} {'max':>6} {'<=0.15':>7} {'dE2000: median':>15} {'p95':>5} {'max':>5}"
    )
    accuracies = [bench_accuracy(w, h, frames, args.seed) for w, h in SIZES]
    for acc in accuracies:
        fe, de = acc.fill_err, acc.de
        within = sum(e <= FILL_GOAL_ML for e in fe) / max(1, len(fe))
        print(
            f"{acc.size:<14} {acc.frames:>6} {acc.not_ok:>8} {statistics.median(fe):>20.4f} "
            f"{pct(fe, 95):>6.3f} {max(fe):>6.3f} {within:>7.1%} {statistics.median(de):>15.2f} "
            f"{pct(de, 95):>5.2f} {max(de):>5.2f}"
        )
    print()
    fps640 = verify_fps["640x480"]
    fill_ok = all(max(a.fill_err) <= FILL_GOAL_ML and a.not_ok == 0 for a in accuracies)
    de_ok = all(statistics.median(a.de) < DE_GOAL for a in accuracies)
    print(
        f"goals: verify >= {FPS_GOAL:.0f} frames/s at 640x480 on one core: {fps640:.0f} "
        f"({'met' if fps640 >= FPS_GOAL else 'NOT met'}); fill error <= {FILL_GOAL_ML:.2f} mL "
        f"(5% of {CAPACITY_ML} mL) on every frame: {'met' if fill_ok else 'NOT met'}; "
        f"colour median dE2000 < {DE_GOAL}: {'met' if de_ok else 'NOT met'}"
    )
    print(f"(run took {time.perf_counter() - t_start:.1f} s)")


if __name__ == "__main__":
    main()
