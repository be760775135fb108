# diffusers-flash: CUDA graphs for the fast path: a model's call captured once per input signature and
# replayed, and the wrappers that take the place of a UNet's forward, a VAE's decode and a text encoder's.
"""Graph capture and replay for the fast path (engine.py applies them)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from diffusers.utils import logging

logger = logging.get_logger(__name__)


def reason(e: Exception) -> str:
    """An exception as one line for the log: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class _Captured:
    __slots__ = ("graph", "inputs", "out", "generation")


class WeightCheck:
    """Where a model's parameters and buffers were when its graphs were captured. A graph replays those
    addresses, so weights that moved since (``pipe.to("cpu")`` and back, a dtype cast, CPU offload moving them
    at each call, a parameter replaced by another) would be read from memory that is no longer theirs:
    silently wrong images. Each call compares the addresses (a list walk, about 0.1 ms for SD 1.x's UNet);
    where they moved, the ``generation`` goes up and every graph of an older one is captured again. Weights
    changed in place (a LoRA fused, ``load_state_dict``) keep their addresses and need nothing. Past
    ``MAX_MOVES`` moves the model runs without graphs from then on, with the reason logged once."""

    MAX_MOVES = 3

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        self.model, self.name = model, name
        self.generation, self.moves, self.gave_up = 0, 0, None
        self._slots: list[tuple[dict, str]] | None = None
        self._at: list[int] = []

    def _take(self) -> None:
        self._slots = [(m._parameters, n) for m in self.model.modules() for n, t in m._parameters.items()
                       if t is not None]
        self._slots += [(m._buffers, n) for m in self.model.modules() for n, t in m._buffers.items() if t is not None]
        self._at = self._addresses()

    def _addresses(self) -> list[int]:
        out = []
        for d, n in self._slots:
            t = d.get(n)
            out.append(-1 if t is None else t.data_ptr())
        return out

    def current(self) -> int:
        """The generation of the weights as they are now (checked against the last snapshot)."""
        if self._slots is None:
            self._take()
        elif self._addresses() != self._at:
            self.moves += 1
            self.generation += 1
            self._take()
            if self.moves > self.MAX_MOVES and self.gave_up is None:
                self.gave_up = (f"its weights moved {self.moves} times since its graphs were captured (CPU "
                                f"offload, or repeated .to()): it runs without CUDA graphs from now on")
                logger.warning(f"fast path: the {self.name}: {self.gave_up}")
            elif self.gave_up is None:
                logger.info(f"fast path: the {self.name}'s weights moved since its graphs were captured "
                            f"(.to(), a cast, offload): its graphs are captured again")
        return self.generation


class GraphedCall:
    """``fn(*tensors)`` (returning a tensor or a tuple of tensors) captured as a CUDA graph once per input
    signature, with static input buffers; later calls copy their inputs in, replay, and get clones of the
    outputs (callers such as PNDM keep past outputs: the static buffers are never handed out). A capture
    that fails is logged once with its reason and ``fn`` runs eagerly from then on."""

    def __init__(self, fn: Callable[..., Any], name: str, pool: Any = None, warmup: int = 2,
                 prepare: Callable[..., Any] | None = None, after: Callable[..., Any] | None = None,
                 weights: WeightCheck | None = None) -> None:
        # prepare: called with the same inputs once before a capture's warm-up, its result unused; after:
        # called with them once the warm-up (where torch.compile compiles) is done, before the capture;
        # weights: the model's WeightCheck (a graph of weights that have moved since is captured again)
        self.fn, self.name, self.pool, self.warmup, self.prepare = fn, name, pool, warmup, prepare
        self.after, self.weights = after, weights
        self.graphs = {}
        self.failed = None  # the reason capture was given up, if it was
        self.capture_s = 0.0  # seconds spent capturing, compiles included (the warm-up this model costs)

    def __call__(self, *tensors: torch.Tensor) -> Any:
        generation = self.weights.current() if self.weights is not None else 0
        if self.failed is not None or (self.weights is not None and self.weights.gave_up):
            self.graphs.clear()  # graphs of weights that moved: their memory back to the pool
            return self.fn(*tensors)
        key = tuple((t.shape, t.dtype, t.device) for t in tensors)
        cap = self.graphs.get(key)
        if cap is not None and cap.generation != generation:  # captured on weights that have moved since
            del self.graphs[key]
            cap = None
        if cap is None:
            try:
                cap = self.graphs[key] = self._capture(tensors)
            except Exception as e:  # e.g. a model that syncs with the host inside its forward
                self.failed = reason(e)
                logger.warning(f"fast path: the {self.name} is not captured as a CUDA graph and runs as before "
                               f"({self.failed})")
                torch.cuda.synchronize()
                return self.fn(*tensors)
        for buf, t in zip(cap.inputs, tensors):
            buf.copy_(t)
        cap.graph.replay()
        out = tuple(o.clone() for o in cap.out)
        return out if len(out) > 1 else out[0]

    def _capture(self, tensors: tuple[torch.Tensor, ...]) -> _Captured:
        start = time.perf_counter()
        cap = _Captured()
        # contiguous static buffers whatever the caller's layout (copy_ converts): the compiled code then
        # sees one layout per shape (the helper process compiles for that one)
        cap.inputs = tuple(t.clone(memory_format=torch.contiguous_format) for t in tensors)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            if self.prepare is not None:  # an uncompiled run first: the attention dispatcher plans each shape
                self.prepare(*cap.inputs)  # eagerly, so torch.compile then traces no planning code (no graph breaks)
            for _ in range(self.warmup):  # compiles, kernels pick algorithms and attention plans are made here
                self.fn(*cap.inputs)
            if self.after is not None:
                self.after(*cap.inputs)
        torch.cuda.current_stream().wait_stream(side)
        cap.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cap.graph, pool=self.pool):
            out = self.fn(*cap.inputs)
        cap.out = out if isinstance(out, tuple) else (out,)
        cap.generation = self.weights.generation if self.weights is not None else 0
        torch.cuda.synchronize()
        took = time.perf_counter() - start
        self.capture_s += took
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
        logger.info(f"fast path: captured the {self.name} for {shapes} in {took:.1f} s")
        return cap


class Static(tuple):
    """A layout entry for a value that is part of the layout rather than a graph input (a graph per value)."""

    __slots__ = ()


def split_extra(kwargs: dict, device: torch.device, static: tuple[type, ...] = ()) -> tuple[tuple, tuple] | None:
    """Keyword arguments as (layout, tensors) for a graph: None values are left out, a tensor on ``device``
    (the sample's) is an input, a dict of such tensors (SDXL's ``added_cond_kwargs``:
    ``text_embeds``, ``time_ids``) gives one input per entry, a value of a ``static`` type (the transformer
    denoisers' ``return_dict=False``) is part of the layout; ``layout`` names them (hashable: one graph per
    layout and shapes). None where a value is anything else (e.g. LoRA's ``cross_attention_kwargs={"scale":
    0.5}``, a tensor on another device): that call is not captured."""
    def here(value: object) -> bool:
        return isinstance(value, torch.Tensor) and value.device == device

    layout, tensors = [], []
    for name in sorted(kwargs):
        value = kwargs[name]
        if value is None:
            continue
        if here(value):
            layout.append((name, None))
            tensors.append(value)
        elif isinstance(value, dict) and all(here(v) for v in value.values()):
            layout.append((name, tuple(sorted(value))))
            tensors.extend(value[k] for k in sorted(value))
        elif static and isinstance(value, static):
            layout.append((name, Static((type(value), value))))
        else:
            return None
    return tuple(layout), tuple(tensors)


def join_extra(layout: tuple, tensors: tuple) -> dict:
    """The keyword arguments ``split_extra`` took apart, rebuilt around ``tensors`` (the graph's buffers)."""
    out, at = {}, 0
    for name, keys in layout:
        if keys is None:
            out[name], at = tensors[at], at + 1
        elif isinstance(keys, Static):
            out[name] = keys[1]
        else:
            out[name], at = dict(zip(keys, tensors[at:at + len(keys)])), at + len(keys)
    return out


class GraphedCalls:
    """A wrapper with one GraphedCall per layout of its call (``calls``): all their graphs, keyed by layout
    and input signature, and the seconds all their captures took."""

    calls: dict

    @property
    def graphs(self) -> dict[tuple, _Captured]:
        return {(layout, key): cap for layout, call in self.calls.items() for key, cap in call.graphs.items()}

    @property
    def capture_s(self) -> float:
        return sum(call.capture_s for call in self.calls.values())


class GraphedForward(GraphedCalls):
    """Takes the place of a UNet2DConditionModel's ``forward`` (the UNet object itself stays, so saving,
    ``.to()`` and its config work as before). Training (grad enabled) and CPU inputs take the plain
    forward. Tensor keyword arguments (SDXL's ``added_cond_kwargs``, ``timestep_cond``) are graph inputs:
    one graph per layout of them (``split_extra``) and per shapes."""

    def __init__(self, forward: Callable[..., Any], pool: Any = None, warmup: int = 2,
                 prepare: Callable[..., Any] | None = None, after: Callable[..., Any] | None = None,
                 weights: WeightCheck | None = None) -> None:
        self.inner = forward  # the UNet's own forward, or torch.compile of it
        self._args = (pool, warmup, prepare, after)
        self.weights = weights
        self.calls: dict[tuple, GraphedCall] = {}
        self.graphed = self._call(())  # SD 1.x/2.x: (sample, timestep, encoder_hidden_states) alone
        self._timesteps = {}

    def _call(self, layout: tuple) -> GraphedCall:
        call = self.calls.get(layout)
        if call is None:
            pool, warmup, prepare, after = self._args

            # fn(sample, timestep, states, **kwargs) called with the kwargs as extra tensors
            def taking(fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
                if fn is None:
                    return None
                return lambda s, t, c, *x: fn(s, t, c, **join_extra(layout, x))

            forward = taking(self.inner)
            call = self.calls[layout] = GraphedCall(lambda *a: forward(*a).sample, "UNet step", pool, warmup,
                                                    taking(prepare), taking(after), self.weights)
        return call

    def __call__(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, *args: Any,
                 return_dict: bool = True, **kwargs: Any) -> Any:
        UNet2DConditionOutput = _output_class("UNet2DConditionOutput", "unet_2d_condition", "unets.unet_2d_condition")

        # newer releases pass more (timestep_cond, cross_attention_kwargs, added_cond_kwargs, ...): tensors are
        # graph inputs; a call with anything else set is not the captured one and takes the UNet's own forward
        extra = None if args else split_extra(kwargs, sample.device)
        if torch.is_grad_enabled() or not sample.is_cuda or extra is None:
            return self.inner(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        layout, tensors = extra
        out = self._call(layout)(sample, self._timestep(timestep, sample.device), encoder_hidden_states, *tensors)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def _timestep(self, t: Any, device: torch.device) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and t.device == device:
            return t.reshape(())
        # a Python number or a CPU tensor: copied to the GPU once per value (a copy per step would make the
        # host wait for the GPU at every step)
        t = torch.as_tensor(t)
        key = (t.item(), t.dtype)
        if key not in self._timesteps:
            self._timesteps[key] = t.reshape(()).to(device)
        return self._timesteps[key]


def _output_class(name: str, *modules: str) -> type:
    """Upstream's output dataclass ``name`` from the first of ``diffusers.models.<module>`` that has it (it
    moved between releases: unet_2d_condition -> unets.unet_2d_condition, vae -> autoencoders.vae)."""
    import importlib

    for mod in modules:
        try:
            return getattr(importlib.import_module(f"diffusers.models.{mod}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"no diffusers.models module of {', '.join(modules)} has {name}")


class GraphedDecode:
    """Takes the place of an AutoencoderKL's ``decode``."""

    def __init__(self, decode: Callable[..., Any], pool: Any = None, prepare: Callable[..., Any] | None = None,
                 after: Callable[..., Any] | None = None, weights: WeightCheck | None = None) -> None:
        self.inner = decode
        self.graphed = GraphedCall(lambda z: decode(z).sample, "VAE decode", pool, warmup=1, prepare=prepare,
                                   after=after, weights=weights)

    def __call__(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None, **kwargs: Any) -> Any:
        DecoderOutput = _output_class("DecoderOutput", "vae", "autoencoders.vae")

        # newer pipelines pass generator= (AutoencoderKL.decode takes it and does not use it): the captured call
        # serves it; any other argument set takes the VAE's own decode
        if torch.is_grad_enabled() or not z.is_cuda or any(v is not None for v in kwargs.values()):
            if generator is not None:
                kwargs["generator"] = generator
            return self.inner(z, return_dict=return_dict, **kwargs)
        dec = self.graphed(z)
        return DecoderOutput(sample=dec) if return_dict else (dec,)


# the text encoders whose plain calls are graphed: CLIP (SD 1.x/2.x, Flux), CLIP with projection (SDXL's second
# encoder, SD3's two) and T5's encoder (SD3, Flux); their outputs hold tensors and tuples of tensors alone
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")


def flatten_output(out: Any) -> tuple[tuple, tuple[torch.Tensor, ...]]:
    """A text encoder's output (a transformers ModelOutput or a tuple) as (spec, tensors): ``spec`` says how
    ``unflatten_output`` builds it again around other tensors (a graph's outputs). Fields that are None are
    left out, as ModelOutput leaves them out."""
    items = list(out.items()) if hasattr(out, "items") else list(enumerate(out))
    fields, tensors = [], []
    for key, value in items:
        if isinstance(value, torch.Tensor):
            fields.append((key, None))
            tensors.append(value)
        elif isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
            fields.append((key, len(value)))
            tensors.extend(value)
        elif value is not None:
            raise TypeError(f"a text encoder output field {key!r} of type {type(value).__name__} cannot be graphed")
    return (type(out), tuple(fields)), tuple(tensors)


def unflatten_output(spec: tuple, tensors: tuple[torch.Tensor, ...]) -> Any:
    cls, fields = spec
    values, at = {}, 0
    for key, n in fields:
        if n is None:
            values[key], at = tensors[at], at + 1
        else:
            values[key], at = tuple(tensors[at:at + n]), at + n
    if cls is tuple:  # a model configured with return_dict=False
        return tuple(values[i] for i in range(len(values)))
    return cls(**values)


class GraphedTextForward(GraphedCalls):
    """Takes the place of a text encoder's ``forward`` (``TEXT_ENCODERS``) for the pipelines' plain calls:
    ``encoder(ids)`` and ``encoder(ids, output_hidden_states=True/False)`` (SDXL and SD3 take a hidden layer
    of the CLIP encoders, Flux passes False): one graph per value of that flag and per shape, the output built
    again as the model's own class. Any other call (masks, other options, grad, CPU ids) takes the model's own
    forward."""

    def __init__(self, forward: Callable[..., Any], pool: Any = None, prepare: Callable[..., Any] | None = None,
                 after: Callable[..., Any] | None = None, name: str = "text encoder",
                 weights: WeightCheck | None = None) -> None:
        self.inner = forward
        self.name, self._args, self.weights = name, (pool, prepare, after), weights
        self.calls: dict[bool | None, GraphedCall] = {}
        self.specs: dict[bool | None, tuple] = {}
        self.graphed = self._call(None)

    def _call(self, hidden: bool | None) -> GraphedCall:
        call = self.calls.get(hidden)
        if call is None:
            pool, prepare, after = self._args
            forward, kwargs = self.inner, {} if hidden is None else {"output_hidden_states": hidden}

            def run(ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
                self.specs[hidden], tensors = flatten_output(forward(ids, **kwargs))
                return tensors

            call = self.calls[hidden] = GraphedCall(run, self.name, pool, warmup=1, prepare=prepare, after=after,
                                                    weights=self.weights)
        return call

    def __call__(self, input_ids: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        hidden = kwargs.pop("output_hidden_states", None)
        if (args or any(v is not None for v in kwargs.values()) or hidden not in (None, True, False)
                or input_ids is None or not input_ids.is_cuda or torch.is_grad_enabled()):
            if hidden is not None:
                kwargs["output_hidden_states"] = hidden
            return self.inner(input_ids, *args, **kwargs)
        out = self._call(hidden)(input_ids)  # its function ran (and set the spec) before any replay
        return unflatten_output(self.specs[hidden], out if isinstance(out, tuple) else (out,))
