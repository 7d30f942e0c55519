"""The extractor's CUDA and low-precision paths, proven on a CPU: fake CUDA tensors, bf16 autocast, host syncs."""
import ast
import itertools
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode
from torch.func import functional_call
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchvision.models.detection._utils import BoxCoder

import extractor.detector.model as model_module
import extractor.extract as extract_module
from extractor.detector.config import SCALE_CLAMP, DetectorConfig
from extractor.detector.model import BoxDecoder, VGDetector
from extractor.detector.selection import select_caffe
from extractor.detector.weights import save_detectron2_weights
from extractor.extract import BoxRule, ExtractionError, extract_features, tf32_mode, to_host
from extractor.store import FeatureReader

REPO = Path(__file__).resolve().parent.parent


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, :, :3][:, :, ::-1])


def _tiny(seed: int = 0, **changes) -> VGDetector:
    torch.manual_seed(seed)
    model = VGDetector(DetectorConfig.load("tiny").replace(**changes))
    with torch.no_grad():  # sharper class scores than the default init, so selection has something to choose
        model.roi_heads.box_predictor.cls_score.weight.mul_(60)
    return model


# ---------------------------------------------------------------- fake CUDA tensors (no GPU needed)

def _on_fake_cuda(model: VGDetector) -> tuple[FakeTensorMode, dict]:
    """A fake-tensor mode and the model's parameters and buffers as fake tensors on cuda:0 (meta storage)."""
    mode = FakeTensorMode(shape_env=ShapeEnv())  # the shape env gives NMS / nonzero outputs symbolic sizes
    with mode:
        state = {k: mode.from_tensor(v, static_shapes=True).to("cuda")
                 for k, v in itertools.chain(model.named_parameters(), model.named_buffers())}
    return mode, state


def _fake_images(sizes: list[tuple[int, int]], dtype: torch.dtype = torch.uint8) -> list[torch.Tensor]:
    return [torch.empty(3, h, w, dtype=dtype, device="cuda") for h, w in sizes]


@pytest.mark.parametrize("amp, resize", [(None, "detectron2"), (torch.bfloat16, "caffe"),
                                         (torch.float16, "detectron2")])
def test_detector_forward_on_fake_cuda_has_no_device_mismatch(amp, resize, monkeypatch):
    # torch.autocast("cuda") switches itself off without a GPU; the fake CUDA tensors do not need one
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    model = _tiny(resize=resize)
    model.roi_heads.region_chunk = 10_000  # one chunk: the chunk test below covers splitting
    dtypes = {}
    model.proposal_generator.rpn_head.register_forward_hook(lambda m, i, o: dtypes.update(rpn=o[0].dtype))
    model.backbone.register_forward_hook(lambda m, i, o: dtypes.update(c4=o.dtype))
    model.roi_heads.box_predictor.register_forward_hook(lambda m, i, o: dtypes.update(heads={t.dtype for t in o}))
    mode, state = _on_fake_cuda(model)
    with warnings.catch_warnings(), mode:
        warnings.simplefilter("ignore", FutureWarning)  # torchvision's NMS registration names an old API
        images = _fake_images([(224, 224), (224, 336), (224, 224)], torch.float32 if resize == "caffe" else torch.uint8)
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            dets = functional_call(model, state, (images,))
        host = to_host(dets, BoxRule("maxnms", 10, 36))
    assert len(dets) == 3
    for d in dets:
        assert {t.device.type for t in (d.proposals, d.scores, d.boxes, d.features, d.attr_scores)} == {"cuda"}
        assert d.scores.dtype == d.features.dtype == d.boxes.dtype == torch.float32
    assert {t.device.type for d in host for t in (d.proposals, d.scores, d.boxes, d.features)} == {"cpu"}
    assert dtypes["c4"] == (amp or torch.float32)  # the backbone runs in the autocast dtype
    assert dtypes["rpn"] == torch.float32 and dtypes["heads"] == {torch.float32}  # RPN and predictors never


def test_fake_cuda_catches_a_tensor_made_on_the_cpu(monkeypatch):
    """The check above can fail: anchors made without device= meet the CUDA logits and raise."""
    def cpu_anchors(cells, height, width, stride, offset):
        xs = torch.arange(width, dtype=torch.float32) * stride + offset * stride
        ys = torch.arange(height, dtype=torch.float32) * stride + offset * stride
        sy, sx = torch.meshgrid(ys, xs, indexing="ij")
        return (torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4) + cells.view(1, -1, 4)).reshape(-1, 4)

    monkeypatch.setattr(model_module, "grid_anchors", cpu_anchors)
    model = _tiny()
    mode, state = _on_fake_cuda(model)
    with warnings.catch_warnings(), mode, pytest.raises(FakeTensorDeviceMismatchError, match="two devices"):
        warnings.simplefilter("ignore", FutureWarning)
        functional_call(model, state, (_fake_images([(224, 224)]),))


# ---------------------------------------------------------------- tensor factories name their device

FACTORIES = {"zeros", "ones", "full", "empty", "empty_strided", "arange", "range", "tensor", "as_tensor", "rand",
             "randn", "randint", "randperm", "linspace", "logspace", "eye", "scalar_tensor"}
# Functions that make tensors on the host by design, and why (module construction, host-side input).
HOST_ALLOWED = {
    ("model.py", "cell_anchors"): "built once in __init__ as a buffer, which moves with module.to(device)",
    ("model.py", "VGDetector.__init__"): "pixel_mean / pixel_std buffers, moved with module.to(device)",
}
CHECKED = ("extractor/detector/model.py", "extractor/detector/losses.py", "extractor/detector/selection.py")


def factories_without_device(source: str, filename: str) -> list[str]:
    """`file:line function: torch.f(...)` for every torch tensor factory called without device= in functions."""
    found = []

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                visit(child, scope + [child.name])
                continue
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                    and isinstance(child.func.value, ast.Name) and child.func.value.id == "torch"
                    and child.func.attr in FACTORIES and scope
                    and not any(k.arg == "device" for k in child.keywords)
                    and (filename, ".".join(scope)) not in HOST_ALLOWED):
                found.append(f"{filename}:{child.lineno} {'.'.join(scope)}: torch.{child.func.attr}(...)")
            visit(child, scope)

    visit(ast.parse(source), [])
    return found


def test_tensor_factories_in_forward_and_loss_code_pass_device():
    problems = [p for path in CHECKED
                for p in factories_without_device((REPO / path).read_text(), Path(path).name)]
    assert problems == []
    used = {(Path(p).name, name) for p in CHECKED
            for name in _functions_calling_factories((REPO / p).read_text())}
    assert set(HOST_ALLOWED) <= used  # every exemption still names real code


def _functions_calling_factories(source: str) -> set[str]:
    saved = dict(HOST_ALLOWED)
    HOST_ALLOWED.clear()
    try:
        return {p.split(" ")[1].rstrip(":") for p in factories_without_device(source, "x")}
    finally:
        HOST_ALLOWED.update(saved)


def test_factory_checker_flags_a_missing_device():
    src = ("import torch\n"
           "class Head:\n"
           "    def forward(self, x):\n"
           "        return x + torch.zeros(3) + torch.ones(3, device=x.device)\n")
    assert factories_without_device(src, "m.py") == ["m.py:4 Head.forward: torch.zeros(...)"]


# ---------------------------------------------------------------- host syncs and launches per batch

SYNC_OPS = {"aten.nonzero.default", "aten._local_scalar_dense.default", "torchvision.nms.default",
            "aten.masked_select.default", "aten.item.default", "aten.is_nonzero.default", "aten.equal.default"}


class DeviceWork(TorchDispatchMode):
    """Counts what one thread asks of a (fake) CUDA device: launches, host syncs (data-dependent sizes, scalar
    reads, blocking host-to-device copies such as torch.tensor(0.5, device=cuda)), device-to-host copies."""

    def __init__(self) -> None:
        super().__init__()
        self.launches, self.syncs, self.copies_to_host, self.ops = 0, Counter(), 0, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        self.ops[name] += 1
        inputs = {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        outputs = {t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        if "cuda" in inputs and outputs == {"cpu"}:
            self.copies_to_host += 1
        elif inputs == {"cpu"} and "cuda" in outputs and not kwargs.get("non_blocking", False):
            self.syncs["copy to the device"] += 1
        elif name in SYNC_OPS or (name == "aten.index.Tensor" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_leaves(args[1:]))):
            self.syncs[name] += 1
        elif "cuda" in outputs and not func.is_view and not name.startswith("prim."):
            self.launches += 1
        return out


def _main_thread_work(model: VGDetector, mode: FakeTensorMode, state: dict, n: int) -> DeviceWork:
    """What the extraction loop's main thread does for a batch of n equal-sized images: detect, one host copy."""
    work = DeviceWork()
    with warnings.catch_warnings(), mode:
        warnings.simplefilter("ignore", FutureWarning)
        images = _fake_images([(224, 224)] * n)
        with work:
            to_host(functional_call(model, state, (images,)), BoxRule("caffe", 10, 100))
    return work


def test_a_batch_costs_one_host_copy_and_no_selection_on_the_main_thread():
    model = _tiny()
    model.roi_heads.region_chunk = 10_000
    mode, state = _on_fake_cuda(model)
    one, four = (_main_thread_work(model, mode, state, n) for n in (1, 4))
    assert one.copies_to_host == four.copies_to_host == 1  # the whole batch in one copy
    # the RPN's per-image NMS and its one nonzero are the only host syncs left; selection added six an image
    assert one.syncs == Counter({"torchvision.nms.default": 1, "aten.nonzero.default": 1})
    assert four.syncs == Counter({"torchvision.nms.default": 4, "aten.nonzero.default": 4})
    assert not {"aten.sort.stable", "aten.sort.default"} & set(four.ops)  # no box selection here
    per_image = (four.launches - one.launches) / 3
    assert per_image <= 50  # the RPN's top-k / decode / clip / NMS, box clipping (selection on CUDA: ~2,100)


def test_box_decoder_equals_torchvisions_without_making_tensors():
    torch.manual_seed(0)
    for weights, classes in (((1.0, 1.0, 1.0, 1.0), 1), ((10.0, 10.0, 5.0, 5.0), 7)):
        boxes = torch.rand(50, 4) * 500
        boxes[:, 2:] += boxes[:, :2]
        deltas = torch.randn(50, 4 * classes) * 3
        deltas[::7] *= 40  # past the log-scale clamp
        theirs = BoxCoder(weights, bbox_xform_clip=SCALE_CLAMP).decode_single(deltas, boxes)
        work = DeviceWork()
        with work:
            ours = BoxDecoder(weights, bbox_xform_clip=SCALE_CLAMP).decode_single(deltas, boxes)
        assert torch.equal(ours, theirs)
        assert "aten.lift_fresh.default" not in work.ops  # torchvision's torch.tensor(0.5): a blocking copy on CUDA


def test_selection_runs_on_the_writer_thread(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()).save(images / f"{name}.png")
    save_detectron2_weights(_tiny(), tmp_path / "w.pkl")
    threads = set()
    real = extract_module.select_caffe

    def spy(*args, **kwargs):
        import threading

        threads.add(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(extract_module, "select_caffe", spy)
    work = DeviceWork()
    with work:
        s = extract_features(images, tmp_path / "w.pkl", tmp_path / "f.h5", config="tiny", boxes=5, batch_size=3,
                             num_workers=0, progress=False)
    assert s["stored"] == 3 and s["boxes_per_image"] == 5.0
    assert threads == {"feature-writer"}
    assert "aten.sort.stable" not in work.ops  # caffe_max_conf's argsort never ran on the main thread


# ---------------------------------------------------------------- bf16 on the CPU

def test_roi_pooling_and_predictors_work_under_cpu_autocast():
    model = _tiny()
    photo = model.prepare(_bgr(data.coffee()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        c4 = model.backbone(model.normalize(photo[None]))
        boxes = [torch.tensor([[10.0, 20.0, 120.0, 200.0], [0.0, 0.0, 300.0, 224.0]])]
        pooled = model.roi_heads.pool(c4, boxes)  # torchvision's roi_pool alone refuses bf16 features on CPU
        logits, deltas, attrs = model.roi_heads.box_predictor(model.roi_heads(pooled))
    assert c4.dtype == pooled.dtype == torch.bfloat16
    assert torch.equal(pooled.float(), model.roi_heads.pool(c4.float(), boxes))  # a max of bf16 values is exact
    assert logits.dtype == deltas.dtype == attrs.dtype == torch.float32


def test_bf16_keeps_batch_invariance_and_stays_close_to_float32():
    model = _tiny()
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.astronaut()[:, ::-1]]
    images = [model.prepare(_bgr(np.ascontiguousarray(p))) for p in photos]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batched = model(images)
        singles = [model([x])[0] for x in images]
    reference = model(images)
    for s, b, f in zip(singles, batched, reference):
        assert torch.equal(s.proposals, b.proposals)  # float32 objectness: no ties, same top-k and NMS
        assert torch.equal(select_caffe(s.proposals, s.scores)[0], select_caffe(b.proposals, b.scores)[0])
        assert torch.allclose(b.features, s.features, rtol=1e-2, atol=1e-2 * float(s.features.abs().max()))
        assert torch.allclose(s.scores.sum(1), torch.ones(len(s.scores)), atol=1e-5)
        assert s.proposals.shape[0] == f.proposals.shape[0]


def test_bf16_without_bf16_instructions_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(extract_module, "cpu_has_bf16", lambda: False)
    with pytest.raises(ExtractionError, match=r"amp='bf16' on the CPU needs bf16 instructions \(AVX-512 BF16 or "
                                              r"AMX\), which this CPU lacks") as e:
        extract_features(tmp_path, tmp_path / "w.pkl", tmp_path / "f.h5", config="tiny", amp="bf16")
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not extract_module.cpu_has_bf16(), reason="this CPU has no bf16 instructions")
def test_bf16_extraction_on_the_cpu(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(data, name)()).save(images / f"{name}.png")
    save_detectron2_weights(_tiny(), tmp_path / "w.pkl")
    runs = {amp: extract_features(images, tmp_path / "w.pkl", tmp_path / f"{amp}.h5", config="tiny", boxes=10,
                                  amp=amp, num_workers=0, progress=False) for amp in (None, "bf16")}
    assert runs["bf16"]["amp"] == "bf16" and FeatureReader(tmp_path / "bf16.h5").attrs["amp"] == "bf16"
    assert FeatureReader(tmp_path / "None.h5").attrs["amp"] == "none"
    assert runs["bf16"]["stored"] == 2


@pytest.mark.parametrize("has_bf16", [False, True])
def test_auto_amp_extracts_in_bf16_only_where_the_cpu_has_it_and_records_what_ran(tmp_path, monkeypatch, has_bf16):
    """amp="auto" is float32 on a CPU without bf16 instructions (bit-identical to no amp) and bf16 where it has
    them; the file and the summary name the mode that ran, never "auto"."""
    if has_bf16 and not extract_module.cpu_has_bf16():
        pytest.skip("this CPU has no bf16 instructions")
    from extractor import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: has_bf16)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(data.astronaut()).save(images / "astronaut.png")
    save_detectron2_weights(_tiny(), tmp_path / "w.pkl")
    runs = {amp: extract_features(images, tmp_path / "w.pkl", tmp_path / f"{amp}.h5", config="tiny", boxes=10,
                                  amp=amp, num_workers=0, progress=False) for amp in (None, "auto")}
    ran = "bf16" if has_bf16 else "none"
    assert FeatureReader(tmp_path / "auto.h5").attrs["amp"] == ran
    assert runs["auto"]["amp"] == (ran if has_bf16 else None)
    same = np.array_equal(FeatureReader(tmp_path / "auto.h5").get("astronaut").features,
                          FeatureReader(tmp_path / "None.h5").get("astronaut").features)
    assert same != has_bf16  # float32 when it falls back; bf16 changes the features


def test_resolve_amp_follows_the_device(monkeypatch):
    from extractor import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [precision.resolve_amp(a, cpu) for a in ("none", "bf16", "fp16", "auto")] == ["none", "bf16", "fp16",
                                                                                          "none"]
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.resolve_amp("auto", cpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, expected in ((True, "bf16"), (False, "none")):  # an older GPU: float32, not fp16's loss scaling
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, supported=supported, **k: supported)
        assert precision.resolve_amp("auto", cuda) == expected
    assert precision.resolve_amp("auto", torch.device("meta")) == "none"


# ---------------------------------------------------------------- res5 chunks, cuda:N, TF32

def test_region_chunks_give_identical_features():
    model = _tiny()
    images = [model.prepare(_bgr(p)) for p in (data.astronaut(), data.coffee())]
    whole = model(images)
    model.roi_heads.region_chunk = 16
    chunked = model(images)
    for a, b in zip(whole, chunked):
        assert a.features.shape[0] > 16
        assert torch.equal(a.features, b.features) and torch.equal(a.scores, b.scores)


def test_cuda_n_becomes_the_current_device(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d).index))
    dev, _ = extract_module._resolve_device("cuda:1", "bf16")
    assert dev == torch.device("cuda", 1) and chosen == [1]
    with pytest.raises(ExtractionError, match=r"device='cuda:2' but only 2 CUDA device\(s\) are visible"):
        extract_module._resolve_device("cuda:2", None)
    with pytest.raises(ExtractionError, match="is not a device"):
        extract_module._resolve_device("gpu0", None)


@pytest.mark.parametrize("enabled, inside", [(False, "ieee"), (True, "tf32")])
def test_tf32_is_off_during_cuda_extraction_unless_asked(enabled, inside):
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with tf32_mode(torch.device("cuda"), enabled):
        assert (conv.fp32_precision, matmul.fp32_precision) == (inside, inside)
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with tf32_mode(torch.device("cpu"), enabled):  # nothing to decide on a CPU
        assert (conv.fp32_precision, matmul.fp32_precision) == before


# ---------------------------------------------------------------- the Luigi task

def test_luigi_extraction_takes_amp_resize_and_tf32_and_names_its_output_by_them(tmp_path, monkeypatch):
    import luigi
    from pipeline_helpers import sample_images, tiny_detector_weights

    from pipeline.features import ExtractFeatures

    monkeypatch.setenv("LXMERT_WORKDIR", str(tmp_path / "work"))
    given = {"images": str(sample_images(tmp_path / "images", 2)), "config": "tiny", "boxes": 4,
             "weights": str(tiny_detector_weights(tmp_path / "tiny.pkl")), "decode_workers": 0}
    params = {name: given.get(name, p._default) for name, p in ExtractFeatures.get_params()}
    amp = "bf16" if extract_module.cpu_has_bf16() else "none"
    task = ExtractFeatures(**{**params, "amp": amp, "resize": "caffe"})
    plain = ExtractFeatures(**params)
    assert len({task.signature(), plain.signature(), ExtractFeatures(**{**params, "tf32": True}).signature(),
                ExtractFeatures(**{**params, "resize": "caffe"}).signature()}) == 4  # each changes features
    assert ExtractFeatures(**{**params, "region_chunk": 7}).signature() == plain.signature()  # memory only
    assert luigi.build([task], local_scheduler=True, log_level="CRITICAL")
    attrs = FeatureReader(ExtractFeatures.path(task.output_dir())).attrs
    assert (attrs["amp"], attrs["resize"], attrs["tf32"]) == (amp, "caffe", False)
