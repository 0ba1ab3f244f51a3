"""Per-sample gradient norms and the clipped sum from one forward/backward pass.

The torch.func engine (``vmap(grad(...))``) materialises a gradient per record for every
parameter and then clips them; for a CNN of 100k parameters that costs 2-3 plain steps. This
engine follows the *book-keeping* design of Bu et al. ("Differentially private optimization
on large model at small cost", ICML 2023), which combines ghost clipping (Li et al.,
"Large language models can be strong differentially private learners", ICLR 2022;
Goodfellow 2015 for the linear-layer norm identity) with reuse of the captured tensors:

1. one forward pass records, for each layer, its input ``a`` and output ``z``;
2. ``torch.autograd.grad`` of the sum of per-record losses, asked only for the outputs with
   no other recorded output upstream, computes each layer's output gradient ``g`` (row i
   is d loss_i / d z_i) on the way; no parameter gradient is computed;
3. a hook on each output computes, as soon as ``g`` exists, the layer's per-record squared
   gradient norms from ``(a, g)`` and releases ``a``:

   * ``Linear`` without positions: ``||g_i a_i^T||^2 = ||a_i||^2 ||g_i||^2``;
   * ``Linear`` over positions and ``Conv1d``/``Conv2d`` (inputs unfolded to patches
     ``U_i``, T positions, p = C_in k, d = C_out): the per-record gradient
     ``g_i U_i^T`` is materialised when ``T p d <= T^2 (p + d)`` (for a convolution with
     ``C_in >= GROUPED_MIN_IN_CHANNELS`` by one grouped-convolution backward with the batch
     folded into the groups, otherwise by patches and one batched matmul), else the Gram
     identity ``sum_{t,t'} (U_i^T U_i)_{tt'} (g_i^T g_i)_{tt'}`` is used;
   * ``GroupNorm``'s affine parameters: closed form from the normalised input;

4. the clip factors ``c_i = min(1, C / (||grad_i|| + 1e-6))`` (Opacus' flat clipping)
   weight ``g`` and one matmul per layer gives ``sum_i c_i grad_i`` directly: no second
   backward pass.

Only models whose every trainable parameter belongs to a supported layer, used once per
forward pass, qualify (:func:`layerwise_unsupported_reason`); others use the torch.func
engine, and :class:`secfl.privacy.dpsgd.PerSampleGradients` says which it chose. The
per-record gradients this engine implies are tested against Opacus' ``GradSampleModule`` and
the torch.func engine to 1e-6 (``tests/test_privacy_layerwise.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: Added to the per-sample norm before dividing, as Opacus does.
CLIP_EPSILON = 1e-6

_CONV = (nn.Conv1d, nn.Conv2d)
_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.GroupNorm)


#: A per-record loss ``(logits, labels, teacher_logits) -> losses`` of shape (B,); record
#: i's loss may depend only on row i of each argument (as the cross-entropy, or the
#: distillation objective of :mod:`secfl.client.distill`), which is what makes row i of
#: the output gradient record i's own.
RecordLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class LayerwiseUnsupported(RuntimeError):
    """Raised during a step when the model does something the engine cannot account for
    (a layer used twice, an output modified in place); the caller falls back."""


def layerwise_unsupported_reason(model: nn.Module) -> str | None:
    """``None`` if :class:`LayerwiseClipping` can handle ``model``, else why not."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    if any(count > 1 for count in uses.values()):
        return "a parameter is shared between layers"
    trainable = 0
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        trainable += len(own)
        label = name or type(module).__name__
        if type(module) not in _SUPPORTED:
            return f"layer {label} ({type(module).__name__}) has no layerwise rule"
        if isinstance(module, _CONV):
            if module.groups != 1:
                return f"layer {label}: grouped convolution (groups={module.groups})"
            if isinstance(module.padding, str) or module.padding_mode != "zeros":
                return f"layer {label}: padding {module.padding!r}/{module.padding_mode}"
    if trainable == 0:
        return "the model has no trainable parameters"
    return None


@dataclass(frozen=True)
class ClippedSum:
    """The sum over the batch of per-record gradients clipped to ``max_grad_norm``, the
    per-record norms before clipping, and the batch's summed loss."""

    grads: dict[str, torch.Tensor]
    norms: torch.Tensor
    loss_sum: float


@dataclass
class _Capture:
    module: nn.Module
    names: dict[str, str]  # "weight"/"bias" -> the parameter's full name
    shapes: dict[str, torch.Size]
    activation: torch.Tensor | None = None
    output: torch.Tensor | None = None
    version: int = 0  # the output's version counter when captured
    input_version: int = 0
    calls: int = 0


def _patches(module: nn.Conv1d | nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """Patches ``(B, C_in * prod(kernel), T)`` of a convolution's input (zero padding), in
    the order of ``weight.reshape(C_out, -1)``: a strided view of the padded input copied
    once, positions innermost (on CPU several times faster than ``F.unfold``'s im2col, and
    it covers Conv1d as well)."""
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    padding = module.padding
    if isinstance(padding, str):
        raise LayerwiseUnsupported(f"padding {padding!r}")
    dims = len(kernel)
    pads: list[int] = []
    for p in reversed(padding):
        pads += [p, p]
    padded = F.pad(a, pads) if any(pads) else a
    spatial = padded.shape[2:]
    out = [(spatial[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(dims)]
    st = padded.stride()
    view = padded.as_strided(
        (padded.shape[0], padded.shape[1], *kernel, *out),
        (
            st[0],
            st[1],
            *(st[2 + i] * dilation[i] for i in range(dims)),
            *(st[2 + i] * stride[i] for i in range(dims)),
        ),
    )
    return view.reshape(padded.shape[0], -1, math.prod(out))


#: Convolutions with at least this many input channels get their per-record weight gradients
#: from one grouped-convolution backward (:func:`_conv_per_sample`) instead of patches and a
#: batched matmul. Measured on CPU, one thread, batch 64, 3x3 kernels: C_in 16 -> 32 at 14x14
#: 2.2 ms against 4.8 ms (patches copy + bmm), C_in 8 -> 16 at 14x14 0.7 against 1.8 ms;
#: with C_in 1 or 3 the grouped kernel is 1.5-3x slower (0.7 against 1.8 ms for 1 -> 16 at
#: 28x28), since each group's reduction is then only k*k long.
GROUPED_MIN_IN_CHANNELS = 8


def _conv_per_sample(
    module: nn.Conv1d | nn.Conv2d, a: torch.Tensor, g: torch.Tensor
) -> torch.Tensor:
    """Per-record weight gradients ``(B, C_out, C_in * prod(kernel))`` of a convolution with
    input ``a`` and output gradient ``g`` (``(B, C_out, *spatial_out)``).

    With ``C_in >= GROUPED_MIN_IN_CHANNELS``: the batch is folded into the channels
    (``(1, B C_in, ...)``, ``(1, B C_out, ...)``) and the weight gradient of a convolution
    with ``groups = B`` is, group by group, record i's gradient (Rochette, Manoel & Tramel,
    "Efficient per-example gradient computations in convolutional neural networks", 2019):
    one ``aten.convolution_backward`` call asking for the weight gradient only, so the
    backend's convolution kernel does the work and no patches are copied. Otherwise patches
    and one batched matmul."""
    batch, out_channels = g.shape[0], g.shape[1]
    if module.in_channels < GROUPED_MIN_IN_CHANNELS:
        return torch.bmm(g.reshape(batch, out_channels, -1), _patches(module, a).transpose(1, 2))
    padding = module.padding
    if isinstance(padding, str):
        raise LayerwiseUnsupported(f"padding {padding!r}")
    # Only the weight's shape matters for the weight gradient; its values are never read.
    folded_weight = a.new_empty(batch * out_channels, *module.weight.shape[1:])
    weight_grad = torch.ops.aten.convolution_backward(
        g.reshape(1, batch * out_channels, *g.shape[2:]),
        a.reshape(1, batch * a.shape[1], *a.shape[2:]),
        folded_weight,
        None,
        list(module.stride),
        list(padding),
        list(module.dilation),
        False,
        [0] * len(module.stride),
        batch,
        [False, True, False],
    )[1]
    return weight_grad.reshape(batch, out_channels, -1)


def _group_norm_per_sample(
    module: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-record gradients ``(B, C)`` of a GroupNorm's weight and bias from its input ``a``
    and output gradient ``g``: ``sum_s g_s n_s`` with ``n`` the normalised input (recomputed
    by ``F.group_norm`` without affine), and ``sum_s g_s``. ``linalg.vecdot`` fuses the
    product and the sum (about 2.5x faster than ``(g * n).sum`` on CPU, and no product
    tensor of the activation's size)."""
    batch, channels = g.shape[0], g.shape[1]
    normalised = F.group_norm(a, module.num_groups, eps=module.eps)
    g3 = g.reshape(batch, channels, -1)
    weight = torch.linalg.vecdot(g3, normalised.reshape(batch, channels, -1))
    return weight, g3.sum(2)


def _materialise_cheaper(t: int, p: int, d: int) -> bool:
    """Whether per-record gradients ``(d, p)`` summed over T positions cost fewer
    multiplications materialised (``T p d``) than by the Gram identity (``T^2 (p + d)``)."""
    return t > 1 and t * p * d <= t * t * (p + d)


_Terms = tuple[torch.Tensor, Callable[[torch.Tensor], dict[str, torch.Tensor]]]


def _upstream_roots(outputs: list[torch.Tensor]) -> list[int]:
    """Indices of the outputs with no other output of the list upstream of them in the
    autograd graph; asking ``autograd.grad`` for these computes every other output's
    gradient on the way. Raises :class:`LayerwiseUnsupported` if the graph is odd."""
    owner: dict[object, int] = {}
    nodes = []
    for i, o in enumerate(outputs):
        node = o.grad_fn
        if node is None or node in owner:
            raise LayerwiseUnsupported("a layer output has no or a shared autograd node")
        owner[node] = i
        nodes.append(node)
    roots: list[int] = []
    for i, start in enumerate(nodes):
        stack = [n for n, _ in start.next_functions if n is not None]
        seen: set[object] = set()
        covered = False
        while stack and not covered:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node in owner:
                covered = True
            else:
                stack.extend(n for n, _ in node.next_functions if n is not None)
        if not covered:
            roots.append(i)
    if not roots:
        raise LayerwiseUnsupported("no layer output without another upstream")
    return roots


class _Matmul:
    """Per-record gradients ``g_i x_i^T`` of a weight applied at T positions, with ``g``
    ``(B, d, T)`` and ``x`` ``(B, p, T)``; materialises them or uses the Gram identity,
    whichever costs fewer multiplications (:func:`_materialise_cheaper`).
    :meth:`from_per_sample` wraps per-record gradients built another way."""

    def __init__(self, g: torch.Tensor, x: torch.Tensor) -> None:
        self.g: torch.Tensor | None = g
        self.x: torch.Tensor | None = x
        t, p, d = x.shape[2], x.shape[1], g.shape[1]
        self.per_sample: torch.Tensor | None = None  # (B, d, p)
        if t == 1:
            self.norm2 = (x[:, :, 0] ** 2).sum(1) * (g[:, :, 0] ** 2).sum(1)
        elif _materialise_cheaper(t, p, d):
            self.per_sample = torch.bmm(g, x.transpose(1, 2))
            self.norm2 = self.per_sample.flatten(1).pow(2).sum(1)
            self.g = self.x = None  # not needed for the clipped sum
        else:
            gram_x = torch.bmm(x.transpose(1, 2), x)
            gram_g = torch.bmm(g.transpose(1, 2), g)
            self.norm2 = (gram_x * gram_g).flatten(1).sum(1)

    @classmethod
    def from_per_sample(cls, per_sample: torch.Tensor) -> _Matmul:
        """From materialised per-record gradients ``(B, d, p)``."""
        self = cls.__new__(cls)
        self.g = self.x = None
        self.per_sample = per_sample
        self.norm2 = per_sample.flatten(1).pow(2).sum(1)
        return self

    def weighted_sum(self, factor: torch.Tensor) -> torch.Tensor:
        """``sum_i factor_i g_i x_i^T`` as ``(d, p)``."""
        if self.per_sample is not None:
            batch, d, p = self.per_sample.shape
            return (factor @ self.per_sample.reshape(batch, d * p)).reshape(d, p)
        if self.g is None or self.x is None:
            raise LayerwiseUnsupported("neither per-record gradients nor their factors kept")
        scaled = (self.g * factor[:, None, None]).transpose(0, 1).flatten(1)  # (d, B T)
        return scaled @ self.x.transpose(1, 2).flatten(0, 1)


def _conv_weight_terms(module: nn.Conv1d | nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> _Matmul:
    """Per-record norms and clipped sums of a convolution's weight: per-record gradients by
    :func:`_conv_per_sample` where materialising is cheaper, else the Gram identity."""
    g3 = g.reshape(g.shape[0], g.shape[1], -1)  # (B, C_out, T)
    if _materialise_cheaper(g3.shape[2], module.weight[0].numel(), g3.shape[1]):
        return _Matmul.from_per_sample(_conv_per_sample(module, a, g))
    return _Matmul(g3, _patches(module, a))


class LayerwiseClipping:
    """Clipped per-record gradient sums for models made of Linear, Conv1d, Conv2d and
    GroupNorm layers (plus parameter-free layers), without per-record gradients for the
    whole model. Check :func:`layerwise_unsupported_reason` first."""

    def __init__(self, model: nn.Module, *, loss: RecordLoss | None = None) -> None:
        reason = layerwise_unsupported_reason(model)
        if reason is not None:
            raise LayerwiseUnsupported(reason)
        self.model = model
        #: The per-record loss; None is the cross-entropy on the labels.
        self.loss = loss
        self._captures: list[_Capture] = []
        for prefix, module in model.named_modules():
            names = {
                local: f"{prefix}.{local}" if prefix else local
                for local, p in module.named_parameters(recurse=False)
                if p.requires_grad
            }
            if names:
                shapes = {
                    local: p.shape
                    for local, p in module.named_parameters(recurse=False)
                    if local in names
                }
                self._captures.append(_Capture(module, names, shapes))

    def _hook(self, capture: _Capture) -> Callable[..., None]:
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: object) -> None:
            capture.calls += 1
            if not isinstance(output, torch.Tensor):
                raise LayerwiseUnsupported(f"{type(module).__name__} returned no tensor")
            capture.activation = inputs[0].detach()
            capture.input_version = inputs[0]._version
            capture.output = output
            capture.version = output._version

        return record

    def _forward(
        self, x: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The summed loss, every capture holding its layer's input and output (checked:
        each layer ran once, nothing was modified in place)."""
        handles = [c.module.register_forward_hook(self._hook(c)) for c in self._captures]
        try:
            for c in self._captures:
                c.calls, c.activation, c.output = 0, None, None
            with torch.enable_grad():
                logits = self.model(x)
                if self.loss is None:
                    loss = F.cross_entropy(logits, y, reduction="sum")
                else:
                    loss = self.loss(logits, y, teacher).sum()
        finally:
            for handle in handles:
                handle.remove()
        for c in self._captures:
            if c.calls != 1 or c.output is None:
                raise LayerwiseUnsupported(
                    f"{type(c.module).__name__} ran {c.calls} times in one forward pass"
                )
            if c.output._version != c.version or (
                c.activation is not None and c.activation._version != c.input_version
            ):
                raise LayerwiseUnsupported(
                    f"the input or output of {type(c.module).__name__} was modified in place"
                )
        return loss

    def _forward_backward(
        self, x: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None = None
    ) -> tuple[float, list[torch.Tensor]]:
        """Summed loss and each layer's output gradient (row i: d loss_i / d z_i)."""
        loss = self._forward(x, y, teacher)
        outputs = [c.output for c in self._captures if c.output is not None]
        grads = torch.autograd.grad(loss, outputs, allow_unused=True)
        out_grads = [
            torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grads, strict=True)
        ]
        for c in self._captures:
            c.output = None
        return float(loss.detach()), out_grads

    def _terms_in_backward(
        self, x: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None = None
    ) -> tuple[float, list[_Terms]]:
        """Summed loss and every layer's terms, each computed by a hook on the layer's output
        the moment the backward pass has its gradient, after which the layer's input is
        released. Only the outputs with no other captured output upstream are asked of
        ``autograd.grad`` (one, for a sequential model); the rest are reached on the way.
        Asking for every output made autograd hold all of their gradients, and the
        captures all inputs, to the end of the pass: ~8 ms instead of ~6 ms for the backward
        of the bench CNN, mostly fresh-page faults, since the backward's own temporaries
        could not reuse that memory."""
        loss = self._forward(x, y, teacher)
        outputs = [c.output for c in self._captures if c.output is not None]
        roots = _upstream_roots(outputs)
        terms: list[_Terms | None] = [None] * len(outputs)

        def on_gradient(index: int) -> Callable[[torch.Tensor], None]:
            def compute(g: torch.Tensor) -> None:
                with torch.no_grad():
                    terms[index] = self._layer_terms(self._captures[index], g)
                self._captures[index].activation = None

            return compute

        handles = [
            outputs[i].register_hook(on_gradient(i)) for i in range(len(outputs)) if i not in roots
        ]
        blanks = [(o.shape, o.dtype, o.device) for o in outputs]
        targets = [outputs[i] for i in roots]
        del outputs  # the hooks live on the autograd nodes; the graph frees what it saved
        for c in self._captures:
            c.output = None
        try:
            grads = torch.autograd.grad(loss, targets, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        with torch.no_grad():
            for i, target, g in zip(roots, targets, grads, strict=True):
                terms[i] = self._layer_terms(
                    self._captures[i], torch.zeros_like(target) if g is None else g
                )
            done: list[_Terms] = []
            for i, t in enumerate(terms):  # a layer the loss does not depend on: zero
                if t is None:
                    shape, dtype, device = blanks[i]
                    t = self._layer_terms(
                        self._captures[i], torch.zeros(shape, dtype=dtype, device=device)
                    )
                done.append(t)
        for c in self._captures:
            c.activation = None
        return float(loss.detach()), done

    def _layer_terms(
        self, capture: _Capture, g: torch.Tensor
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], dict[str, torch.Tensor]]]:
        """Per-record squared norm of this layer's parameters and a function of the clip
        factors giving the layer's clipped gradient sum."""
        module, a, names = capture.module, capture.activation, capture.names
        shapes = capture.shapes
        if a is None:
            raise LayerwiseUnsupported("no activation captured")
        batch = g.shape[0]
        norm2 = torch.zeros(batch, dtype=g.dtype, device=g.device)
        weight: _Matmul | None = None
        per_sample_small: dict[str, torch.Tensor] = {}  # (B, numel) per parameter
        if isinstance(module, nn.Linear):
            g3 = g.reshape(batch, -1, g.shape[-1]).transpose(1, 2)  # (B, out, T)
            if "weight" in names:
                weight = _Matmul(g3, a.reshape(batch, -1, a.shape[-1]).transpose(1, 2))
            if "bias" in names:
                per_sample_small["bias"] = g3.sum(2)
        elif isinstance(module, _CONV):
            g3 = g.reshape(batch, g.shape[1], -1)  # (B, C_out, T)
            if "weight" in names:
                weight = _conv_weight_terms(module, a, g)
            if "bias" in names:
                per_sample_small["bias"] = g3.sum(2)
        elif isinstance(module, nn.GroupNorm):
            weight_ps, bias_ps = _group_norm_per_sample(module, a, g)
            if "weight" in names:
                per_sample_small["weight"] = weight_ps
            if "bias" in names:
                per_sample_small["bias"] = bias_ps
        else:
            raise LayerwiseUnsupported(f"no rule for {type(module).__name__}")
        if weight is not None:
            norm2 = norm2 + weight.norm2
        for ps in per_sample_small.values():
            norm2 = norm2 + ps.pow(2).sum(1)

        def clipped(factor: torch.Tensor) -> dict[str, torch.Tensor]:
            out: dict[str, torch.Tensor] = {}
            if weight is not None:
                out[names["weight"]] = weight.weighted_sum(factor).reshape(shapes["weight"])
            for local, ps in per_sample_small.items():
                out[names[local]] = (factor @ ps).reshape(shapes[local])
            return out

        return norm2, clipped

    def clipped_sum(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        max_grad_norm: float,
        *,
        teacher: torch.Tensor | None = None,
    ) -> ClippedSum:
        """``sum_i min(1, C / (||grad_i|| + 1e-6)) grad_i`` over the batch, for every
        trainable parameter, with ``grad_i`` the gradient of record i's loss (the
        cross-entropy, or :attr:`loss` with the teacher's logits ``teacher``)."""
        loss_sum, terms = self._terms_in_backward(x, y, teacher)
        with torch.no_grad():
            norms = torch.sqrt(torch.stack([t[0] for t in terms]).sum(0))
            factor = (max_grad_norm / (norms + CLIP_EPSILON)).clamp(max=1.0)
            grads: dict[str, torch.Tensor] = {}
            for _, clipped in terms:
                grads.update(clipped(factor))
        return ClippedSum(grads=grads, norms=norms, loss_sum=loss_sum)

    def per_sample_gradients(
        self, x: torch.Tensor, y: torch.Tensor, *, teacher: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Materialised per-record gradients from the same captured tensors (for tests and
        audits; the training step never builds them)."""
        _, out_grads = self._forward_backward(x, y, teacher)
        result: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for c, g in zip(self._captures, out_grads, strict=True):
                module, a, names = c.module, c.activation, c.names
                if a is None:
                    raise LayerwiseUnsupported("no activation captured")
                batch = g.shape[0]
                if isinstance(module, nn.Linear):
                    g3 = g.reshape(batch, -1, g.shape[-1])
                    a3 = a.reshape(batch, -1, a.shape[-1])
                    weight = torch.einsum("btd,btp->bdp", g3, a3)
                    bias = g3.sum(1)
                elif isinstance(module, _CONV):
                    g3 = g.reshape(batch, g.shape[1], -1)
                    weight = _conv_per_sample(module, a, g)
                    bias = g3.sum(2)
                elif isinstance(module, nn.GroupNorm):
                    weight, bias = _group_norm_per_sample(module, a, g)
                else:
                    raise LayerwiseUnsupported(f"no rule for {type(module).__name__}")
                for local, value in (("weight", weight), ("bias", bias)):
                    if local in names:
                        result[names[local]] = value.reshape(batch, *c.shapes[local])
                c.activation = None
        return result
