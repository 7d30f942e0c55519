"""Luigi parameters derived from the config dataclasses: names, types, defaults from the stage's recipe."""
from dataclasses import replace

import luigi
import pytest

from pipeline.params import config_values, parameter
from pipeline.training import (
    FINETUNE_SETTINGS,
    LOOP_SETTINGS,
    RUN_SETTINGS,
    EvaluateGQA,
    FinetuneGQA,
    FinetuneNLVR2,
    FinetuneVQA,
    PretrainLXMERT,
)
from tasks.benchmarks import GQA, NLVR2, VQA
from tasks.finetune import FinetuneConfig
from tasks.pretrain import PretrainConfig


@pytest.mark.parametrize("task, recipe", [(PretrainLXMERT, PretrainConfig().train), (FinetuneVQA, VQA.recipe()),
                                          (FinetuneGQA, GQA.recipe()), (FinetuneNLVR2, NLVR2.recipe())])
def test_training_parameters_default_to_the_stage_recipe(task, recipe):
    params = dict(task.get_params())
    assert {name: params[name]._default for name in LOOP_SETTINGS} == {n: getattr(recipe, n) for n in LOOP_SETTINGS}
    assert {name for name in LOOP_SETTINGS if not params[name].significant} == set(RUN_SETTINGS)
    assert isinstance(params["optimizer"], luigi.ChoiceParameter) and isinstance(params["lr"], luigi.FloatParameter)


def test_the_recipes_are_the_papers():
    pretraining = PretrainConfig().train
    assert (pretraining.batch_size, pretraining.epochs, pretraining.lr, pretraining.warmup_ratio,
            pretraining.clip_grad_norm) == (256, 20, 1e-4, 0.05, 1.0)
    assert [(r.batch_size, r.epochs, r.lr, r.warmup_ratio, r.clip_grad_norm) for r in
            (VQA.recipe(), GQA.recipe(), NLVR2.recipe())] == [(32, 4, 5e-5, 0.1, 5.0), (32, 4, 1e-5, 0.1, 5.0),
                                                               (32, 4, 5e-5, 0.1, 5.0)]
    assert dict(PretrainLXMERT.get_params())["model"]._default == "base"
    assert dict(EvaluateGQA.get_params())["device"].significant is False


def test_parameters_read_back_as_the_config_fields(tmp_path):
    task = FinetuneGQA(lr=0.5, loss="ce", dropout=-1.0, epochs=3, device="cpu")
    assert config_values(task, FinetuneConfig, FINETUNE_SETTINGS) == {"dropout": None, "loss": "ce",
                                                                       "max_seq_length": 20}
    train = task.train_config(tmp_path)
    assert train == replace(GQA.recipe(), lr=0.5, epochs=3, device="cpu", batch_size=task.batch_size,
                            optimizer=task.optimizer, num_workers=task.num_workers, amp=task.amp,
                            output_dir=str(tmp_path),
                            resume=True, progress=False)
    assert config_values(FinetuneGQA(dropout=0.2), FinetuneConfig, ("dropout",)) == {"dropout": 0.2}


def test_parameter_of_each_field_type():
    assert isinstance(parameter(int, 3), luigi.IntParameter)
    assert parameter(float | None, None)._default == -1.0  # a negative number stands for None
    choice = parameter(str, "bce", choices=("bce", "ce"))
    assert isinstance(choice, luigi.ChoiceParameter) and choice.parse("ce") == "ce"
    with pytest.raises(ValueError, match="bogus"):
        choice.normalize("bogus")
    with pytest.raises(TypeError, match="optional"):
        parameter(str | None, None)
