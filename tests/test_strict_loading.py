"""Strict loading (issue 14): weights that do not fit their config, non-float or non-finite weights and
config.json sizes that cannot describe a network are one-line errors naming the file, the tensor or the
field, before anything is allocated or trained; partial loads are asked for and say what was left fresh."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import luigi
import pytest
import torch
from safetensors.torch import load_file, save_file

from model import LxmertConfig, LxmertForNLVR2, LxmertForPreTraining, LxmertForQuestionAnswering
from model.checkpoint import CheckpointError, load_into, tied_duplicates
from model.config import MAX_PARAMETERS, ConfigError
from pipeline.training import FinetuneVQA, PretrainLXMERT
from tasks import finetune
from tasks.data.answers import AnswerTable, default_pretrain_table, default_vqa_table
from tasks.data.tokenization import save_vocabulary
from tasks.demo.feature_world import write_world
from tasks.finetune import FinetuneConfig, build_model
from tasks.pretrain import PretrainConfig
from tasks.pretrain import build_model as build_pretraining_model
from tasks.training.weights import model_config_from

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = LxmertConfig(vocab_size=30, hidden_size=16, num_attention_heads=2, intermediate_size=24, l_layers=2,
                   x_layers=1, r_layers=1, visual_feat_dim=16, num_object_labels=5, num_attr_labels=4,
                   num_qa_labels=len(default_pretrain_table()), max_position_embeddings=16)
FRESH = "left freshly initialised"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world"), n_images=8, max_boxes=4, feature_dim=16)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A small pretraining network (random weights) saved as a model directory."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pretrained")
    LxmertForPreTraining(CFG).save_pretrained(path)
    return path


def copy_with(source: Path, dest: Path, config: dict | None = None, **tensors: torch.Tensor) -> Path:
    """A copy of the model directory `source` with config.json fields and tensors replaced."""
    dest.mkdir(parents=True, exist_ok=True)
    values = {**json.loads((source / "config.json").read_text()), **(config or {})}
    (dest / "config.json").write_text(json.dumps(values))
    state = {**load_file(str(source / "model.safetensors")), **tensors}
    save_file(state, str(dest / "model.safetensors"))
    return dest


def fresh_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if FRESH in r.getMessage()]


def listed_keys(line: str) -> set[str]:
    """The keys a 'left freshly initialised (...): a, b' line lists."""
    return set(line.split("): ", 1)[1].split(", "))


# ------------------------------------------------------------------ weights that do not fit their config

def test_config_json_that_disagrees_with_its_weights_is_refused_naming_both_files(pretrained, tmp_path):
    wide = copy_with(pretrained, tmp_path / "wide", {"hidden_size": 32})
    ours = LxmertForPreTraining(CFG).state_dict()
    theirs = LxmertForPreTraining(dataclasses.replace(CFG, hidden_size=32)).state_dict()
    total = len(ours) - len(tied_duplicates(ours))
    differ = sum(ours[k].shape != theirs[k].shape for k in ours if k not in tied_duplicates(ours))
    with pytest.raises(CheckpointError) as e:
        LxmertForPreTraining.from_pretrained(wide)
    message = str(e.value)
    assert message.startswith(f"{wide / 'model.safetensors'}: weights do not fit {wide / 'config.json'}: "
                              f"{differ} of {total} tensors differ in shape: lxmert.embeddings.")
    assert "(file [30, 16], model [30, 32])" in message and f"and {differ - 3} more" in message
    assert "allow_fresh" in message and "\n" not in message


def test_a_file_with_more_layers_than_its_config_is_refused(pretrained, tmp_path):
    shallow = copy_with(pretrained, tmp_path / "shallow", {"l_layers": 1})
    with pytest.raises(CheckpointError, match=r"tensors of the file's backbone have no place in the model: "
                                              r"lxmert\.encoder\.layer\.1\."):
        LxmertForPreTraining.from_pretrained(shallow)


@pytest.mark.parametrize("bad, message", [
    (float("nan"), "holds 1 non-finite value(s) (NaN or Inf) of 256"),
    (float("inf"), "holds 1 non-finite value(s) (NaN or Inf) of 256"),
    ("int64", "is int64, not floating point"),
])
def test_non_finite_or_non_float_weights_are_refused_naming_file_and_tensor(pretrained, tmp_path, bad, message):
    key = "lxmert.pooler.dense.weight"
    value = load_file(str(pretrained / "model.safetensors"))[key].clone()
    if bad == "int64":
        value = value.long()
    else:
        value[3, 5] = bad
    folder = copy_with(pretrained, tmp_path / "bad", **{key: value})
    with pytest.raises(CheckpointError) as e:
        LxmertForPreTraining.from_pretrained(folder)
    assert str(e.value).startswith(f"{folder / 'model.safetensors'}: tensor '{key}' ")
    assert message in str(e.value)
    cfg = FinetuneConfig(task="vqa", init_from=str(folder))  # the same file as a fine-tuning init
    with pytest.raises(CheckpointError, match=f"^init_from: {folder / 'model.safetensors'}: tensor '{key}'"):
        build_model(cfg, 16, default_vqa_table())


def test_a_damaged_weights_file_is_an_error_naming_it(pretrained, tmp_path):
    folder = copy_with(pretrained, tmp_path / "cut")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"^{folder / 'model.safetensors'}: not a readable safetensors file"):
        LxmertForPreTraining.from_pretrained(folder)


def foreign_weights(path: Path) -> Path:
    """A torch file of tensors none of which belongs to LXMERT (another network's weights)."""
    torch.save({"backbone.conv1.weight": torch.zeros(4, 3), "fc.weight": torch.zeros(2, 4)}, path)
    return path


def test_an_init_holding_none_of_the_models_keys_is_refused_before_building(tmp_path):
    path = foreign_weights(tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError) as e:
        build_model(FinetuneConfig(task="vqa", init_from=str(path), model="tiny"), 16, default_vqa_table())
    assert str(e.value) == (f"init_from: {path} holds no LXMERT weights: none of its 2 tensors is in a backbone "
                            "(lxmert.*, bert.*, encoder.*); it holds backbone.conv1.weight, fc.weight")
    model = LxmertForQuestionAnswering(CFG)
    with pytest.raises(CheckpointError, match=r"none of its 2 tensors fits the model's \d+"):
        load_into(model, torch.load(path), path, strict=False)  # even a partial load needs something to load


def test_the_finetune_command_refuses_a_foreign_init_in_one_line(world, tmp_path, capsys):
    path = foreign_weights(tmp_path / "resnet.pth")
    code = finetune.main(["vqa", "--train-files", str(world.vqa), "--features", str(world.features),
                          "--init-from", str(path), "--model", "tiny", "--device", "cpu", "--num-workers", "0",
                          "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"error: init_from: {path} holds no LXMERT weights: none of its 2 tensors is in a backbone " \
                  "(lxmert.*, bert.*, encoder.*); it holds backbone.conv1.weight, fc.weight\n"


# ------------------------------------------------------------------ Luigi tasks

def build(task: luigi.Task) -> tuple[luigi.LuigiStatusCode, list[str]]:
    """Run `task` with the local scheduler; (status, 'family: message' of each failure)."""
    found: list[str] = []

    def record(failed: luigi.Task, exc: BaseException) -> None:
        found.append(f"{failed.get_task_family()}: {exc}")

    events = (luigi.Event.FAILURE, luigi.Event.BROKEN_TASK)
    for event in events:
        luigi.Task.event_handler(event)(record)
    try:
        result = luigi.build([task], local_scheduler=True, detailed_summary=True, log_level="CRITICAL")
    finally:
        for event in events:
            luigi.Task.remove_event_handler(event, record)
    return result.status, found


def test_finetune_task_fails_cleanly_on_weights_that_do_not_fit(world, pretrained, wd, tmp_path, demo_tiny):
    foreign = foreign_weights(tmp_path / "resnet.pth")
    wide = copy_with(pretrained, tmp_path / "wide", {"hidden_size": 32})
    save_vocabulary(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(25)], wide)
    common = {"features": [str(world.features)], "model": "tiny", "num_workers": 0, "epochs": 1}
    for init, fragment in ((foreign, f"FinetuneVQA: init_from: {foreign} holds no LXMERT weights"),
                           (wide, f"FinetuneVQA: init_from: {wide / 'model.safetensors'}: weights do not fit "
                                  "the network built for this run: ")):
        task = FinetuneVQA(init=str(init), **common)
        status, errors = build(task)
        assert status == luigi.LuigiStatusCode.FAILED
        assert [e for e in errors if e.startswith("FinetuneVQA")] == [e for e in errors if e.startswith(fragment)]
        assert len(errors) == 1 and "\n" not in errors[0] and "KeyError" not in errors[0]
        assert not task.output_dir().exists()


# ------------------------------------------------------------------ config.json

def write_config(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(text)
    return folder / "config.json"


CONFIG_CASES = {
    "heads 0": ({"num_attention_heads": 0}, "field 'num_attention_heads' must be a positive integer, got 0"),
    "negative size": ({"hidden_size": -768}, "field 'hidden_size' must be a positive integer, got -768"),
    "size as a string": ({"hidden_size": "768"},
                         "field 'hidden_size' must be a positive integer, got '768' (a str)"),
    "size as a bool": ({"l_layers": True}, "field 'l_layers' must be a non-negative integer, got True (a bool)"),
    "size as a float": ({"vocab_size": 30522.0},
                        "field 'vocab_size' must be a positive integer, got 30522.0 (a float)"),
    "heads not dividing": ({"num_attention_heads": 5},
                           "field 'hidden_size' (768) must be a multiple of num_attention_heads (5)"),
    "hidden 10^9": ({"hidden_size": 10**9}, "field 'hidden_size' must be at most 16,384, got 1000000000"),
    "too many layers": ({"x_layers": 129}, "field 'x_layers' must be at most 128, got 129"),
    "huge vocabulary": ({"vocab_size": 2 * 10**6}, "field 'vocab_size' must be at most 1,000,000, got 2000000"),
    "dropout 1": ({"hidden_dropout_prob": 1}, "field 'hidden_dropout_prob' must be a probability in [0, 1), got 1"),
    "NaN init range": ({"initializer_range": float("nan")},
                       "field 'initializer_range' must be a finite number >= 0, got nan (a float)"),
    "unknown activation": ({"hidden_act": "tanh"}, "field 'hidden_act' must be one of ['gelu', "),
    "switch as a string": ({"task_qa": "yes"}, "field 'task_qa' must be true or false, got 'yes' (a str)"),
    "another model type": ({"model_type": "bert"}, "field 'model_type' must be 'lxmert', got 'bert' (a str)"),
    "too many parameters": ({"hidden_size": 16384, "num_attention_heads": 16, "intermediate_size": 65536},
                            "these sizes make a network of about "),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_json_field_errors_name_the_file_and_the_field(case, tmp_path):
    values, message = CONFIG_CASES[case]
    path = write_config(tmp_path, json.dumps(values))
    with pytest.raises(ConfigError) as e:
        LxmertConfig.from_json_file(path)
    assert str(e.value).startswith(f"{path}: {message}") and "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("{hidden_size: 4}", "invalid JSON: Expecting property name enclosed in double quotes (line 1 column 2)"),
    ('{"hidden_size": 4', "invalid JSON: Expecting ',' delimiter (line 1 column 18)"),
    ("[768, 12]", "expected a JSON object of config fields, found a JSON list"),
    ("[" * 100_000 + "]" * 100_000, "invalid JSON: nested too deeply"),
])
def test_config_json_that_is_not_a_json_object_is_refused_naming_the_file(text, message, tmp_path):
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        model_config_from(str(path))
    assert str(e.value) == f"{path}: {message}"


def test_a_huge_hidden_size_is_refused_fast_without_allocating(pretrained, tmp_path):
    folder = copy_with(pretrained, tmp_path / "huge", {"hidden_size": 10**9, "num_attention_heads": 8})
    start = time.perf_counter()
    for load in (lambda: LxmertForPreTraining.from_pretrained(folder),
                 lambda: model_config_from(str(folder)),
                 lambda: build_model(FinetuneConfig(task="vqa", init_from=str(folder)), 16, default_vqa_table())):
        with pytest.raises(ConfigError, match=f"{folder / 'config.json'}: field 'hidden_size' must be at most"):
            load()
    assert time.perf_counter() - start < 1.0


def test_layer_counts_read_from_an_original_file_are_bounded(tmp_path):
    state = {f"bert.encoder.layer.{i}.output.dense.bias": torch.zeros(4) for i in (0, 100_000)}
    torch.save(state, tmp_path / "odd_LXRT.pth")
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'odd_LXRT.pth'}: field 'l_layers' must be at most 128"):
        LxmertForPreTraining.from_pretrained(tmp_path / "odd_LXRT.pth")


def test_parameter_estimate_follows_the_real_network():
    for config in (LxmertConfig(), LxmertConfig(num_qa_labels=3129, hidden_size=1024, num_attention_heads=16)):
        with torch.device("meta"):
            real = sum(p.numel() for p in LxmertForPreTraining(config).parameters())
        assert 0.99 * real <= config.parameter_estimate() <= real
    assert MAX_PARAMETERS > 40 * LxmertConfig().parameter_estimate()


def test_pipeline_checks_refuse_bad_config_json_before_work(world, pretrained, wd, tmp_path):
    bad_model = write_config(tmp_path / "model", '{"num_attention_heads": 0}')
    bad_init = copy_with(pretrained, tmp_path / "init", {"hidden_size": "16"})
    for task, line in (
        (PretrainLXMERT(features=[str(world.features)], corpus=[str(world.corpus)], model=str(bad_model)),
         f"PretrainLXMERT: parameter 'model': {bad_model}: field 'num_attention_heads' must be a positive "
         "integer, got 0"),
        (FinetuneVQA(features=[str(world.features)], init=str(bad_init)),
         f"FinetuneVQA: parameter 'init': {bad_init / 'config.json'}: field 'hidden_size' must be a positive "
         "integer, got '16' (a str)"),
    ):
        status, errors = build(task)
        assert status == luigi.LuigiStatusCode.SCHEDULING_FAILED and not wd.exists()
        assert any(f"\n  {line}\n" in e + "\n" for e in errors), errors


# ------------------------------------------------------------------ partial loads, asked for and reported

def test_a_new_answer_head_is_asked_for_and_reported(pretrained, caplog):
    head = "answer_head.logit_fc.3."
    with pytest.raises(CheckpointError, match=r"2 of \d+ tensors differ in shape: answer_head\.logit_fc\.3\."):
        LxmertForQuestionAnswering.from_pretrained(pretrained, num_qa_labels=7)
    caplog.set_level(logging.WARNING, "model.checkpoint")
    qa, info = LxmertForQuestionAnswering.from_pretrained(pretrained, num_qa_labels=7, allow_fresh=(head,),
                                                          output_loading_info=True)
    assert listed_keys(*fresh_lines(caplog)) == {head + "weight", head + "bias"} == set(info.fresh_keys)
    assert f"(allow_fresh ['{head}'])" in fresh_lines(caplog)[0]
    assert all(k.startswith(("cls.", "obj_predict_head.")) for k in info.unexpected_keys)  # heads dropped


def test_strict_false_loads_what_fits_and_lists_the_rest(pretrained, caplog):
    caplog.set_level(logging.WARNING, "model.checkpoint")
    nlvr2 = LxmertForNLVR2.from_pretrained(pretrained, strict=False)
    expected = {f"logit_fc.{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias")}
    assert listed_keys(*fresh_lines(caplog)) == expected and "(strict=False)" in fresh_lines(caplog)[0]
    source = LxmertForPreTraining.from_pretrained(pretrained)
    assert torch.equal(nlvr2.lxmert.pooler.dense.weight, source.lxmert.pooler.dense.weight)


def test_finetuning_from_pretraining_leaves_only_the_task_head_fresh(pretrained, caplog):
    caplog.set_level(logging.WARNING)
    table = default_vqa_table()
    vqa = build_model(FinetuneConfig(task="vqa", init_from=str(pretrained)), 16, table)
    fresh, mapped = fresh_lines(caplog), [r.getMessage() for r in caplog.records if "set from the" in r.getMessage()]
    assert listed_keys(*fresh) == {"answer_head.logit_fc.3.weight", "answer_head.logit_fc.3.bias"}
    assert fresh[0].startswith(f"init_from: {pretrained / 'model.safetensors'}: {FRESH} (allow_fresh ['answer_head.'])")
    assert len(mapped) == 1 and f"of {len(table)} answers found in its table" in mapped[0]
    assert vqa.config.num_qa_labels == len(table)
    caplog.clear()
    build_model(FinetuneConfig(task="nlvr2", init_from=str(pretrained)), 16, None)
    assert listed_keys(*fresh_lines(caplog)) == {f"logit_fc.{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias")}
    # evaluating, or training with allow_fresh=[], takes a complete model only
    for cfg in (FinetuneConfig(task="nlvr2", init_from=str(pretrained), eval_only=True),
                FinetuneConfig(task="nlvr2", init_from=str(pretrained), allow_fresh=[])):
        with pytest.raises(CheckpointError, match=r"6 of \d+ tensors are missing from the file: logit_fc\.0\."):
            build_model(cfg, 16, None)


def test_a_checkpoint_vocabulary_covering_the_tokenizer_loads_strictly(pretrained):
    model = build_model(FinetuneConfig(task="nlvr2", init_from=str(pretrained)), 16, None, vocab_size=20)
    assert model.config.vocab_size == CFG.vocab_size  # the checkpoint's embedding is kept, whole
    with pytest.raises(ValueError, match="vocab: the tokenizer has 40 tokens but .* embeds only 30"):
        build_model(FinetuneConfig(task="nlvr2", init_from=str(pretrained)), 16, None, vocab_size=40)


def test_continued_pretraining_asks_for_a_head_its_init_lacks(tmp_path, caplog):
    table = AnswerTable(["yes", "no", "red"], [["vqa"]] * 3)
    no_qa = LxmertForPreTraining(dataclasses.replace(CFG, task_qa=False, num_qa_labels=3))
    no_qa.save_pretrained(tmp_path / "no_qa")
    cfg = PretrainConfig(init_from=str(tmp_path / "no_qa"))
    with pytest.raises(CheckpointError, match=r"6 of \d+ tensors are missing from the file: answer_head\."):
        build_pretraining_model(cfg, 16, len(table))
    caplog.set_level(logging.WARNING, "model.checkpoint")
    cfg.allow_fresh = ["answer_head."]
    model = build_pretraining_model(cfg, 16, len(table))
    assert {k.rsplit(".", 2)[0] for k in listed_keys(*fresh_lines(caplog))} == {"answer_head.logit_fc"}
    assert torch.equal(model.lxmert.pooler.dense.weight, no_qa.lxmert.pooler.dense.weight)
