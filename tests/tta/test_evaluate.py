"""run_stream: one online pass over a stream, resets where the stream says, errors per domain."""

from __future__ import annotations

import pytest
import torch

from normlab.data.streams import make_stream
from normlab.tta import adapt, run_stream
from tests.tta.conftest import CONV_MODELS, D


def _domains() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {name: ((shift + torch.randn(40, 1, 8, 8, generator=g)).to(D), torch.arange(40) % 5)
            for name, shift in (("a", 0.0), ("b", 1.5))}


@pytest.mark.parametrize("order", ["reset", "continual"])
def test_run_stream_is_the_online_loop(order: str) -> None:
    stream = make_stream(_domains(), batch_size=16, order=order)
    tta = adapt(CONV_MODELS["resnet_normlab_bn"](), "tent")
    result = run_stream(tta, stream)
    tta.reset()
    preds = []
    for i, batch in enumerate(stream):
        if i in stream.resets:
            tta.reset()
        preds.append(tta(batch.x).argmax(-1))
    assert torch.equal(result.predictions, torch.cat(preds))
    assert (len(stream.resets) > 0) == (order == "reset")
    wrong = result.predictions != result.labels
    errors = result.errors()
    assert list(errors) == ["a", "b"]
    assert errors["a"] == pytest.approx(100 * wrong[result.domain == 0].double().mean().item())
    assert result.mean_error() == pytest.approx((errors["a"] + errors["b"]) / 2)


def test_run_stream_bad_arguments() -> None:
    stream = make_stream(_domains(), batch_size=16)
    with pytest.raises(TypeError, match=r"run_stream: expected adapted to be a normlab.tta.Adapted, got ResNet"):
        run_stream(CONV_MODELS["resnet_normlab_bn"](), stream)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"run_stream: expected stream to be an AdaptationStream, got list"):
        run_stream(adapt(CONV_MODELS["resnet_normlab_bn"](), "tbn"), [])  # type: ignore[arg-type]
