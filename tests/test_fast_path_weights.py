"""A graph replays the addresses its weights had when it was captured: weights that moved since (``.to()``
and back, a cast, CPU offload, a parameter replaced) must be captured again, never read from memory that is
no longer theirs. On the CPU the capture is a stand-in (it runs the function into static outputs), so what
is checked is when ``GraphedCall`` captures, replays and gives up; on CUDA the real graphs."""

import numpy as np
import pytest
import torch

from diffusers.flash.fastpath import graphs


def test_weight_check_sees_moves_not_in_place_changes(log):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    check = graphs.WeightCheck(model, "UNet")
    assert check.current() == 0 and check.current() == 0
    model.to(torch.float32)  # nothing to do: the same tensors
    with torch.no_grad():
        model[0].weight.add_(1)  # in place: the graph reads the new values at the same address
    assert check.current() == 0
    model.to(torch.float64)
    assert check.current() == 1 and check.moves == 1 and check.gave_up is None
    model[0].weight = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.float64))  # as accelerate's offload does
    assert check.current() == 2
    model[1].running_mean = torch.zeros(4, dtype=torch.float64)  # buffers count too
    assert check.current() == 3 and check.gave_up is None
    model.to(torch.float32)
    assert check.current() == 4 and "moved 4 times" in check.gave_up
    assert "runs without CUDA graphs" in log.text


class _FakeGraph:
    def __init__(self, fn, cap):
        self.fn, self.cap, self.replays = fn, cap, 0

    def replay(self):
        self.replays += 1
        for buf, out in zip(self.cap.out, (self.fn(*self.cap.inputs),)):
            buf.copy_(out)


@pytest.fixture
def fake_capture(monkeypatch):
    """GraphedCall._capture without CUDA: static inputs and outputs, a 'graph' that recomputes into them."""
    captured = []

    def capture(self, tensors):
        cap = graphs._Captured()
        cap.inputs = tuple(t.clone() for t in tensors)
        cap.out = (self.fn(*cap.inputs).clone(),)
        cap.graph = _FakeGraph(self.fn, cap)
        cap.generation = self.weights.generation if self.weights is not None else 0
        captured.append(cap)
        return cap

    monkeypatch.setattr(graphs.GraphedCall, "_capture", capture)
    return captured


def test_a_graph_of_weights_that_moved_is_captured_again_then_given_up(fake_capture, log):
    model = torch.nn.Linear(3, 2)
    check = graphs.WeightCheck(model, "VAE decode")
    call = graphs.GraphedCall(lambda x: model(x), "VAE decode", weights=check)
    x = torch.ones(1, 3)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(call(x), expected)
        torch.testing.assert_close(call(x), expected)
        assert len(fake_capture) == 1 and fake_capture[0].graph.replays == 2  # the capturing call replays too
        for moves in range(1, graphs.WeightCheck.MAX_MOVES + 1):  # moved: captured again on the new weights
            model.to(torch.float64).to(torch.float32)
            torch.testing.assert_close(call(x), model(x))
            assert len(fake_capture) == 1 + moves and len(call.graphs) == 1, moves
        model.to(torch.float64).to(torch.float32)  # once more: no more graphs for this model
        torch.testing.assert_close(call(x), model(x))
    assert len(fake_capture) == 1 + graphs.WeightCheck.MAX_MOVES and call.graphs == {}
    assert "the VAE decode: its weights moved" in log.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_the_fast_path_follows_weights_moved_after_capture():
    """pipe.to('cpu') and back (new GPU memory for every weight): the next call captures again and gives
    the plain pipeline's images, not ones computed from freed memory."""
    from diffusers.flash import local_pipelines

    pipe = local_pipelines.stable_diffusion("tiny").to("cuda")

    def run():
        return pipe(["a lighthouse"], num_inference_steps=3, height=64, width=64, output_type="np",
                    generator=torch.Generator("cuda").manual_seed(0)).images

    plain = run()
    pipe.enable_fast_path()
    np.testing.assert_allclose(run(), plain, atol=1 / 255)
    before = {name: dict(getattr(pipe, name).__dict__[attr].graphs)
              for name, attr in (("unet", "forward"), ("text_encoder", "forward"))}
    pipe.to("cpu")
    torch.cuda.empty_cache()
    torch.ones(64, 2 ** 20, device="cuda")  # fill the freed memory with other numbers
    pipe.to("cuda")
    np.testing.assert_allclose(run(), plain, atol=1 / 255)
    for name, attr in (("unet", "forward"), ("text_encoder", "forward")):
        wrapper = getattr(pipe, name).__dict__[attr]
        assert wrapper.weights.generation == 1 and dict(wrapper.graphs) != before[name], name
    assert pipe.vae.decode.graphed.weights.generation == 1
