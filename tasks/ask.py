"""Ask a fine-tuned model about an image: its features are extracted with the detector and settings the model
was trained with, and the model's top answers are printed with their probabilities.

    python -m tasks.ask --model work/FinetuneVQA/<id> --detector work/TrainDetector/<id> \\
        --image star.png --question "What color is the star?" [--draw answer.png]
    python -m tasks.ask --model work/FinetuneNLVR2/<id> --detector ... --image left.png --image right.png \\
        --statement "There are two circles."

--model is a fine-tuning run folder (or an evaluation folder, or the model folder inside a run): its
inference.json names the benchmark, the answer table and the feature settings, and --detector must be the
detector its features came from (checked by the weights' sha256). A released model (a transformers folder,
an original *.pth) has no such record: give --task, and --answers for a table other than the released one.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import torch

from extractor.detector.config import ConfigError as DetectorConfigError
from extractor.detector.config import DetectorConfig
from extractor.detector.labels import attribute_names, object_names
from extractor.detector.weights import WeightsError
from extractor.draw import box_name, draw_attention, readable, side_by_side
from extractor.extract import ExtractionError, extract_features
from extractor.fileio import WriteError, atomic_write, file_sha256
from extractor.images import ImageReadError, load_image
from extractor.jsonstream import DataFormatError
from extractor.precision import device_has_bf16
from extractor.store import FeatureReader, FeatureStoreError, ImageFeatures
from model.checkpoint import CheckpointError
from model.config import ConfigError
from tasks.benchmarks import BENCHMARKS
from tasks.inference import Answer, FineTuned, InferenceError, answer, encode_text, load_finetuned

WEIGHT_NAMES = ("weights.pkl", "model_final.pkl", "model_final.pth")  # what a detector folder holds
LABEL_FIELDS = ("object_labels", "attribute_labels")
NOT_COMPARED = {"file", "schema_version", "amp", "tf32"}  # numerics of a device, not what a feature means
RELEASED_BOXES = 36  # the released LXMERT features: 36 boxes per image


def detector_files(detector: str | Path) -> tuple[Path, Path | None]:
    """(weights file, its config YAML or None) of --detector: a TrainDetector folder, a folder holding one
    weights file, or the weights file itself (with `<name>.yaml` or `config.yaml` beside it when there is one)."""
    path = Path(detector)
    if path.is_dir():
        found = [path / n for n in WEIGHT_NAMES if (path / n).is_file()] or sorted(
            p for p in path.iterdir() if p.suffix in (".pkl", ".pth"))
        if len(found) != 1:
            raise InferenceError(f"--detector: {path} holds {len(found)} weights files (*.pkl, *.pth); name one")
        weights = found[0]
        config = next((c for c in (path / "config.yaml", weights.with_suffix(".yaml")) if c.is_file()), None)
        return weights, config
    if not path.is_file():
        raise InferenceError(f"--detector: no detector weights at {path}")
    return path, next((c for c in (path.with_suffix(".yaml"), path.parent / "config.yaml") if c.is_file()), None)


def _identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """A detector config without its label file paths (the same labels may sit in another folder)."""
    return {k: v for k, v in cfg.items() if k not in LABEL_FIELDS}


class Extraction:
    """How the model's training images were extracted, to extract a new image the same way."""

    def __init__(self, ft: FineTuned, detector: str | Path, detector_config: str | None, boxes: int | None) -> None:
        self.weights, yaml = detector_files(detector)
        chosen = yaml or detector_config
        given = DetectorConfig.load(chosen or "VG-R101-C4")
        if not ft.features or not all(f.get("weights_sha256") for f in ft.features):
            # a released model, or one trained on imported features: the detector as given, LXMERT's 36 boxes
            self.config, self.recorded, self.amp = given, None, "none"
            self.kwargs = {"boxes": boxes or RELEASED_BOXES, "selection": "caffe", "dtype": "float32"}
            print(f"note: {ft.weights} records no detector; extracting with {self.weights} ({given.name}), "
                  f"{self.kwargs['boxes']} boxes", file=sys.stderr)
            return
        if boxes is not None:
            raise InferenceError("--boxes: the model records its box rule; --boxes is for models without a record")
        recorded = ft.features[0]
        shas = {f.get("weights_sha256") for f in ft.features}
        sha = file_sha256(self.weights)
        if sha not in shas:
            raise InferenceError(
                f"--detector: {self.weights} (sha256 {sha[:12]}) is not the detector {ft.weights} was trained with "
                f"(its features came from weights sha256 {' / '.join(s[:12] for s in sorted(map(str, shas)))}, "
                f"config {recorded['detector_config'].get('name')}); give that detector")
        cfg = dict(recorded["detector_config"])
        for field in LABEL_FIELDS:  # the recorded label files, or the given detector's when they moved
            if cfg.get(field) and not Path(cfg[field]).is_file():
                cfg[field] = getattr(given, field)
        if chosen and _identity(given.to_dict()) != _identity(cfg):
            print(f"note: {chosen} differs from the config the model's features were "
                  f"extracted with; using the recorded one", file=sys.stderr)
        self.config, self.recorded = DetectorConfig.from_dict(cfg), recorded
        self.amp = str(recorded.get("amp") or "none")
        lo, hi = recorded["min_boxes"], recorded["max_boxes"]
        self.kwargs = {"selection": recorded["box_strategy"], "dtype": recorded["feature_dtype"],
                       **({"boxes": hi} if lo == hi else {"min_boxes": lo, "max_boxes": hi})}

    def features(self, image: Path, work: Path, device: str) -> ImageFeatures:
        """The image's features, extracted as the model's training images were (checked attribute by attribute),
        in the precision they were extracted in where `device` runs it natively, else in float32."""
        out = work / f"{len(list(work.glob('*.h5')))}.h5"
        extract_features([image], self.weights, out, config=self.config, device=device, num_workers=0,
                         max_failure_ratio=0.0, progress=False, amp=self.precision(device), **self.kwargs)
        with FeatureReader(out) as reader:
            record, attrs = reader.get(0), reader.attrs
        if self.recorded is not None:
            for key in sorted((set(attrs) | set(self.recorded)) - NOT_COMPARED):
                mine, theirs = attrs.get(key), self.recorded.get(key)
                if key == "detector_config":
                    mine, theirs = _identity(mine or {}), _identity(theirs or {})
                if mine != theirs:
                    raise InferenceError(f"--image: {image}: its features would differ from the model's training "
                                         f"features in '{key}' ({mine!r} here, {theirs!r} in training)")
        return record

    def precision(self, device: str) -> str | None:
        """The autocast mode to extract in: the training features' own where the device has it natively."""
        amp = self.amp
        if amp == "none":
            return None
        dev = torch.device(device)
        if (amp == "bf16" and device_has_bf16(dev)) or (amp == "fp16" and dev.type == "cuda"):
            return amp
        print(f"note: the model's features were extracted in {amp}, which {device} does not run natively; "
              "extracting in float32 (the features differ in the last digits)", file=sys.stderr)
        return None

    def names(self, record: ImageFeatures) -> list[str]:
        """What the detector calls each box."""
        objects, attributes = object_names(self.config.object_labels), attribute_names(self.config.attribute_labels)
        return [box_name(record, j, objects, attributes) for j in range(record.num_boxes)]


def draw(path: Path, images: Sequence[Path], records: Sequence[ImageFeatures], result: Answer,
         extraction: Extraction) -> None:
    """The images (side by side for a pair) shaded by the attention of the question over their boxes."""
    drawn = [draw_attention(readable(load_image(p)), r.boxes, a, extraction.names(r), (r.img_h, r.img_w))
             for p, r, a in zip(images, records, result.attention)]
    try:
        ok, data = cv2.imencode(path.suffix or ".png", side_by_side(drawn))
    except cv2.error:
        ok = False
    if not ok:
        raise InferenceError(f"--draw: {path}: cannot encode an image of that kind (use .png or .jpg)")
    try:
        atomic_write(path, data.tobytes())
    except WriteError as e:
        raise InferenceError(f"--draw: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tasks.ask", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--model", required=True, help="fine-tuning run folder (or a released model with --task)")
    p.add_argument("--detector", required=True,
                   help="the detector the model's features came from: a TrainDetector folder or a weights file")
    p.add_argument("--image", action="append", required=True, type=Path,
                   help="the image (NLVR2: give it twice, left then right)")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--question", help="for VQA / GQA models")
    text.add_argument("--statement", help="for NLVR2 models: true or false of the two images?")
    p.add_argument("--draw", type=Path, help="write the image(s) shaded by the question's attention (PNG / JPEG)")
    p.add_argument("--top", type=int, default=5, help="answers shown (VQA / GQA)")
    p.add_argument("--task", choices=tuple(BENCHMARKS), help="the benchmark of a model without inference.json")
    p.add_argument("--answers", type=Path, help="ans2label json of its head (default: the run's, else released)")
    p.add_argument("--vocab", type=Path, help="vocab.txt (default: the one beside the weights, else BERT's)")
    p.add_argument("--detector-config", help="config name or YAML of a detector without one beside it "
                                             "(default VG-R101-C4)")
    p.add_argument("--boxes", type=int, help=f"boxes per image for a model without a record (default "
                                             f"{RELEASED_BOXES})")
    p.add_argument("--device", default="cpu")
    return p


def run(args: argparse.Namespace) -> str:
    """Answer; returns what to print."""
    ft = load_finetuned(args.model, args.task, args.answers, args.vocab, args.device)
    pair = len(ft.benchmark.image_keys) == 2
    option = "--statement" if pair else "--question"
    text = args.statement if pair else args.question
    if text is None:
        raise InferenceError(f"{option}: a {ft.benchmark.name} model takes {option}, not "
                             f"{'--question' if pair else '--statement'}")
    if len(args.image) != len(ft.benchmark.image_keys):
        raise InferenceError(f"--image: a {ft.benchmark.name} model takes {len(ft.benchmark.image_keys)} "
                             f"image(s), {len(args.image)} given")
    if args.top < 1:
        raise InferenceError(f"--top: must be >= 1, got {args.top}")
    encode_text(ft, text, option)  # a text too long is refused before any extraction
    for image in args.image:
        try:
            load_image(image)
        except ImageReadError as e:
            raise InferenceError(f"--image: {e}") from None
    extraction = Extraction(ft, args.detector, args.detector_config, args.boxes)
    with tempfile.TemporaryDirectory(prefix="lxmert-ask-") as work:
        records = [extraction.features(image, Path(work), args.device) for image in args.image]
    result = answer(ft, text, records, args.top, option)
    if args.draw:
        draw(args.draw, args.image, records, result, extraction)
    lines = [f"{option[2:]}: {text}"]
    if pair:
        verdict, p = result.top[0]
        lines.append(f"{verdict} (probability {p:.3f})")
    else:
        width = max(len(str(a)) for a, _ in result.top)
        lines += [f"{i:>2}. {str(a):<{width}}  {p:.3f}" for i, (a, p) in enumerate(result.top, start=1)]
    for k, (record, shares) in enumerate(zip(records, result.attention)):
        best = shares.argsort()[::-1][:3]
        names = extraction.names(record)
        where = f"image {k + 1} " if pair else ""
        lines.append(f"{where}attention: " + ", ".join(f"{names[j]} {100 * shares[j]:.0f}%" for j in best))
    if args.draw:
        lines.append(f"drawn: {args.draw}")
    return "\n".join(lines)


USER_ERRORS = (InferenceError, FileNotFoundError, ImageReadError, CheckpointError, ConfigError, DetectorConfigError,
               WeightsError, ExtractionError, FeatureStoreError, DataFormatError, WriteError)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: bad input exits 2 with one line, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
