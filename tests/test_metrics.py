import pytest
import torch
from torch import nn

from otbr_plugin.metrics import BackdoorMetrics, accuracy, defense_effectiveness_rating, evaluate_backdoor, predict
from otbr_plugin.data import Normalizer


class FirstPixelClassifier(nn.Module):
    """Predicts the class written in pixel (0, 0) (as uint8 value), so expected metrics are hand-computable."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        cls = torch.round(x[:, 0, 0, 0] * 255).long()
        return nn.functional.one_hot(cls, 10).float() + self.dummy


def imgs(values):
    x = torch.zeros(len(values), 1, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor(values, dtype=torch.uint8)
    return x


IDENTITY = Normalizer((0.0,), (1.0,))


def test_predict_batched_equals_unbatched():
    x = imgs([3, 1, 4, 1, 5, 9, 2, 6])
    m = FirstPixelClassifier()
    assert predict(m, x, IDENTITY, batch_size=3, device="cpu").tolist() == [3, 1, 4, 1, 5, 9, 2, 6]


def test_hand_computed_acc_asr_ra():
    m = FirstPixelClassifier()
    clean_x, clean_y = imgs([0, 1, 2, 3]), torch.tensor([0, 1, 2, 0])  # 3 of 4 correct
    bd_x = imgs([0, 0, 5, 7, 0])  # predicted: 0 0 5 7 0
    targets = torch.zeros(5, dtype=torch.long)
    true = torch.tensor([1, 2, 5, 3, 4])  # only the third is predicted as its true label
    m_ = evaluate_backdoor(m, clean_x, clean_y, bd_x, targets, true, IDENTITY, device="cpu")
    assert m_.acc == pytest.approx(0.75)
    assert m_.asr == pytest.approx(0.6)
    assert m_.ra == pytest.approx(0.2)


def test_predict_restores_training_mode():
    m = FirstPixelClassifier().train()
    predict(m, imgs([1]), IDENTITY, device="cpu")
    assert m.training


def test_der():
    before = BackdoorMetrics(acc=0.9, asr=1.0, ra=0.0)
    assert defense_effectiveness_rating(before, BackdoorMetrics(0.9, 0.0, 0.9)) == pytest.approx(1.0)
    assert defense_effectiveness_rating(before, BackdoorMetrics(0.8, 0.2, 0.7)) == pytest.approx((0.8 - 0.1 + 1) / 2)
    # an ASR increase or an ACC gain does not count
    assert defense_effectiveness_rating(BackdoorMetrics(0.9, 0.5, 0.1), BackdoorMetrics(0.95, 0.6, 0.1)) == 0.5


def test_metric_validation():
    with pytest.raises(ValueError, match="fraction"):
        BackdoorMetrics(acc=90.0, asr=0.1, ra=0.1)
    with pytest.raises(ValueError, match="zero samples"):
        accuracy(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        accuracy(torch.zeros(2), torch.zeros(3))


def test_predict_default_batch_and_empty_input():
    x = torch.randint(0, 10, (1100, 1, 4, 4), dtype=torch.uint8)
    m = FirstPixelClassifier()
    assert torch.equal(predict(m, x, IDENTITY, device="cpu"), predict(m, x, IDENTITY, batch_size=512, device="cpu"))
    assert predict(m, x[:0], IDENTITY, device="cpu").shape == (0,)
    with pytest.raises(ValueError, match="batch_size"):
        predict(m, x, IDENTITY, batch_size=0, device="cpu")


def test_predict_channels_last_gives_the_same_predictions_and_leaves_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).train()
    x = torch.randint(0, 256, (40, 1, 6, 6), dtype=torch.uint8)
    before = {k: (v.data_ptr(), v.is_contiguous()) for k, v in model.state_dict().items()}
    plain = predict(model, x, IDENTITY, device="cpu")
    last = predict(model, x, IDENTITY, device="cpu", channels_last=True)
    assert (plain == last).float().mean() > 0.95  # other kernels: equal up to float rounding near ties
    assert {k: (v.data_ptr(), v.is_contiguous()) for k, v in model.state_dict().items()} == before
    assert model.training


def test_cpu_default_batch_gives_the_logits_of_batches_of_512():
    """The CPU's evaluation batch is a speed choice only: every image's logits are bit-identical to those computed
    in batches of 512 (the batch of every result committed before it changed), a last partial batch included."""
    from otbr_plugin.metrics import CPU_EVAL_BATCH
    from otbr_plugin.models import create_model

    torch.manual_seed(0)
    model = create_model("preactresnet18", 10, 1, 28, 0.125)
    for m in model.modules():  # running statistics that are not the identity, as a trained model has
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randint(0, 256, (600, 1, 28, 28), dtype=torch.uint8)
    assert CPU_EVAL_BATCH != 512 and 600 % CPU_EVAL_BATCH and 600 % 512
    seen: list[torch.Tensor] = []
    model.register_forward_hook(lambda mod, inp, out: seen.append(out.clone()))
    norm = Normalizer((0.5,), (0.25,))
    default = predict(model, x, norm, device="cpu")
    assert [t.shape[0] for t in seen] == [CPU_EVAL_BATCH] * (600 // CPU_EVAL_BATCH) + [600 % CPU_EVAL_BATCH]
    logits_default, seen[:] = torch.cat(seen), []
    by_512 = predict(model, x, norm, batch_size=512, device="cpu")
    assert [t.shape[0] for t in seen] == [512, 88]
    assert torch.equal(torch.cat(seen), logits_default)
    assert torch.equal(by_512, default)
