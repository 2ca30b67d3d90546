"""Recognizing a model's layer layout by structure, for model types not listed by name.

A candidate layout (``STRUCTURAL_LAYOUTS``) names modules of a layer; every candidate whose modules
the model's first layer has is then checked on a forward pass of the base model over a small dummy
batch (one sequence, evaluation mode, no gradients), before any adapter is attached:

- in every layer, each site's output module runs once per call of the layer and its residual module
  at least once;
- in the first layer (in a hybrid model, whose layers differ in a site's module, the first layer of each
  kind: ``SiteSpec.output_alternatives``), the recorded tensors add up the way the layout says: the
  attention site's residual is the layer input ``x``; the attention block's combination ``h_a + x``
  (normalized, for a post-norm layout, by the layout's norm, whose input must be that sum) is what the
  next site's residual plus its ``residual_plus`` module's output equals, and so on through the sites
  (attention, cross-attention in decoder layers, feed-forward); and the layer output equals the
  feed-forward combination ``h_f + r_f (+ p_f)``, normalized the same way for post-norm layouts.

Encoder-decoder candidates have an encoder stack and a decoder stack whose layers have a third site,
after cross-attention; both stacks are checked, on a dummy batch that also gives the decoder its token
ids. A model that reads no token ids gets random values of the shape its config gives (``_signal_shape``):
speech frames (``input_features``), images or videos (``pixel_values``), spectrograms or raw audio
(``input_values``). The first candidate that passes is used. These are sums of recorded
tensors, so a layer that scales a sub-block output, normalizes it after the module the layout names,
runs attention and feed-forward side by side where the layout says one after the other (or the
reverse), or puts a block the layout does not name between two sites fails the check, and is refused
with the reason for each candidate.
Comparisons use the L2 norm, relative to the summed terms' norms, with a tolerance of four units of
rounding of the recorded dtype (at least 1e-6): far below the size of any sub-block output that a wrong
layout would leave out or add twice.

A model whose parameters are on the meta device cannot be checked; it gets the first candidate whose
modules exist, with a warning. The chosen layout is kept on the base model (also through
``copy.deepcopy``), so the check runs once.
"""

from __future__ import annotations

import inspect
import warnings
from collections import Counter
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .spec import Architecture, ModelLayout, SiteSpec, call_argument, find_layers, get_submodule, missing_modules

LAYERS = ("layers", "model.layers", "decoder.layers", "h", "blocks", "encoder.layer", "encoder.layers",
          "vision_model.encoder.layers", "transformer.layers", "layer")
"""Where, from the base model, a layer list is looked for (the first path present is used). A list under
``encoder`` (``vision_model``) is not taken for a one-stack layout when the base model also has a
``decoder`` (``text_model``): see ``_PAIRED``."""
_PAIRED = {"encoder": "decoder", "vision_model": "text_model"}
"""A stack's top module -> the module beside it whose layers a one-stack layout would leave out."""
ENCODER_DECODER_LAYERS = ("encoder.layers", "decoder.layers")
"""The encoder's and the decoder's layer lists of encoder-decoder candidates, from the base model."""

_NORM_INPUT = ("hidden_states", "input", "x")
_ATTENTIONS = ("self_attn", "self_attention", "attention", "attn")


def _layout(name: str, attention: SiteSpec, ffn: SiteSpec) -> Architecture:
    return Architecture(name, (), LAYERS, attention, ffn)


def _pre(norm: str, output: str, plus: str | None = None) -> SiteSpec:
    """A pre-norm site: ``x + output(norm(x))`` (``+ plus(...)`` in a parallel block)."""
    return SiteSpec(output, norm, 0, _NORM_INPUT, None, plus)


def _encoder_decoder(name: str, attention: SiteSpec, cross: SiteSpec, ffn: SiteSpec) -> Architecture:
    encoder, decoder = ENCODER_DECODER_LAYERS
    return Architecture.from_layouts(name, (), (ModelLayout(encoder, attention, ffn),
                                                ModelLayout(decoder, attention, ffn, cross=cross)))


STRUCTURAL_LAYOUTS: tuple[Architecture, ...] = (
    # BART-style encoder and decoder layers, the decoder's with cross-attention between the two blocks
    _encoder_decoder("pre-norm encoder-decoder (self_attn_layer_norm, self_attn; encoder_attn_layer_norm, "
                     "encoder_attn; final_layer_norm, fc1 ... fc2)",
                     _pre("self_attn_layer_norm", "self_attn"), _pre("encoder_attn_layer_norm", "encoder_attn"),
                     _pre("final_layer_norm", "fc2")),
    # NLLB-MoE's names; the feed-forward block is dense or a mixture of experts (``ffn`` either way)
    _encoder_decoder("pre-norm encoder-decoder (self_attn_layer_norm, self_attn; cross_attention_layer_norm, "
                     "cross_attention; ff_layer_norm, ffn)",
                     _pre("self_attn_layer_norm", "self_attn"), _pre("cross_attention_layer_norm", "cross_attention"),
                     _pre("ff_layer_norm", "ffn")),
    _encoder_decoder("post-norm encoder-decoder (self_attn, self_attn_layer_norm; encoder_attn, "
                     "encoder_attn_layer_norm; fc1 ... fc2, final_layer_norm)",
                     SiteSpec("self_attn", "self_attn", 0, ("hidden_states", "query"), "self_attn_layer_norm"),
                     SiteSpec("encoder_attn", "encoder_attn", 0, ("hidden_states", "query"), "encoder_attn_layer_norm"),
                     SiteSpec("fc2", "fc1", 0, ("input",), "final_layer_norm")),
    # x = x + attn(n1(x)); x = x + ffn(n2(x))
    *(_layout(f"pre-norm layer (input_layernorm, {attn}; post_attention_layernorm, {ffn})",
              _pre("input_layernorm", attn), _pre("post_attention_layernorm", ffn))
      for attn in _ATTENTIONS[:3] for ffn in ("mlp", "block_sparse_moe", "feed_forward")),
    # hybrid models: a layer's token mixer is softmax attention or linear attention (a gated delta net)
    _layout("pre-norm hybrid layer (input_layernorm, self_attn or linear_attn; post_attention_layernorm, mlp)",
            replace(_pre("input_layernorm", "self_attn"), output_alternatives=("linear_attn",)),
            _pre("post_attention_layernorm", "mlp")),
    _layout("pre-norm layer (attention_layernorm, self_attn; feedforward_layernorm, mlp)",
            _pre("attention_layernorm", "self_attn"), _pre("feedforward_layernorm", "mlp")),
    _layout("pre-norm layer (ln_1, attn; ln_2, mlp)", _pre("ln_1", "attn"), _pre("ln_2", "mlp")),
    _layout("pre-norm layer (self_attn_layer_norm, self_attn; final_layer_norm, fc1 ... fc2)",
            _pre("self_attn_layer_norm", "self_attn"), _pre("final_layer_norm", "fc2")),
    # the residual added inside each sub-block (BLOOM): the sites are the sub-blocks' last projections
    _layout("pre-norm layer adding the residual inside its sub-blocks (input_layernorm, self_attention.dense; "
            "post_attention_layernorm, mlp.dense_4h_to_h)",
            _pre("input_layernorm", "self_attention.dense"), _pre("post_attention_layernorm", "mlp.dense_4h_to_h")),
    _layout("pre-norm layer adding the residual inside its feed-forward block (norm_1, attn; norm_2, ffn.down_proj)",
            _pre("norm_1", "attn"), _pre("norm_2", "ffn.down_proj")),
    # x = x + attn(n(x)) + mlp(n(x)): the feed-forward site's residual is x plus the attention output
    *(_layout(f"parallel block ({norm}, {attn} and mlp)", _pre(norm, attn), _pre(norm, "mlp", plus=attn))
      for norm in ("input_layernorm", "ln_1") for attn in _ATTENTIONS),
    # x = x + attn(n1(x)) + mlp(n2(x))
    *(_layout(f"parallel block ({n1}, {attn}; {n2}, mlp)", _pre(n1, attn), _pre(n2, "mlp", plus=attn))
      for n1, n2 in (("input_layernorm", "post_attention_layernorm"), ("ln_attn", "ln_mlp"), ("ln_1", "ln_2"))
      for attn in _ATTENTIONS),
    # sub-block outputs normalized before the residual add: the sites are those norms
    _layout("sandwich-norm layer (self_attn, post_attention_layernorm; mlp, post_feedforward_layernorm)",
            SiteSpec("post_attention_layernorm", "self_attn", 0, ("hidden_states",)),
            SiteSpec("post_feedforward_layernorm", "mlp", 0, _NORM_INPUT)),
    _layout("sandwich-norm layer (input_layernorm, self_attn, post_self_attn_layernorm; post_attention_layernorm, "
            "mlp, post_mlp_layernorm)",
            _pre("input_layernorm", "post_self_attn_layernorm"), _pre("post_attention_layernorm", "post_mlp_layernorm")),
    _layout("sandwich-norm layer (input_layernorm, self_attn, post_attention_layernorm; pre_feedforward_layernorm, "
            "mlp, post_feedforward_layernorm)",
            _pre("input_layernorm", "post_attention_layernorm"),
            _pre("pre_feedforward_layernorm", "post_feedforward_layernorm")),
    # x = n1(x + attn(x)); x = n2(x + fc2(act(fc1(x))))
    _layout("post-norm layer (self_attn, self_attn_layer_norm; fc1 ... fc2, final_layer_norm)",
            SiteSpec("self_attn", "self_attn", 0, ("hidden_states",), "self_attn_layer_norm"),
            SiteSpec("fc2", "fc1", 0, ("input",), "final_layer_norm")),
    # vision and audio encoders: ViT's layer (transformers 4 and 5 layouts), DINOv2's with layer scale
    _layout("pre-norm ViT-style layer (layernorm_before, attention; layernorm_after, intermediate, output: "
            "dense, dropout)",
            _pre("layernorm_before", "attention"), SiteSpec("output.dropout", "output", 1, ("input_tensor",))),
    _layout("pre-norm layer (layernorm_before, attention; layernorm_after, mlp)",
            _pre("layernorm_before", "attention"), _pre("layernorm_after", "mlp")),
    _layout("pre-norm layer with layer scale (norm1, attention, layer_scale1; norm2, mlp, layer_scale2)",
            _pre("norm1", "layer_scale1"), _pre("norm2", "layer_scale2")),
    _layout("pre-norm layer (layer_norm1, self_attn; layer_norm2, mlp)",  # CLIP's and SigLIP's names
            _pre("layer_norm1", "self_attn"), _pre("layer_norm2", "mlp")),
    _layout("pre-norm layer (rms_norm1, attention; rms_norm2, ffn)", _pre("rms_norm1", "attention"),
            _pre("rms_norm2", "ffn")),
    _layout("pre-norm layer (attention_norm, attention; ffn_norm, feed_forward)", _pre("attention_norm", "attention"),
            _pre("ffn_norm", "feed_forward")),
    # wav2vec 2.0's encoder layers, post-norm or (do_stable_layer_norm) pre-norm
    _layout("post-norm speech encoder layer (attention, layer_norm; feed_forward, final_layer_norm)",
            SiteSpec("attention", "attention", 0, ("hidden_states",), "layer_norm"),
            SiteSpec("feed_forward", "feed_forward", 0, ("hidden_states",), "final_layer_norm")),
    _layout("pre-norm speech encoder layer (layer_norm, attention; final_layer_norm, feed_forward)",
            _pre("layer_norm", "attention"), _pre("final_layer_norm", "feed_forward")),
    _layout("post-norm BERT-like layer (attention.output: dense, dropout, LayerNorm; output: dense, dropout, "
            "LayerNorm)",
            SiteSpec("attention.output.dropout", "attention.output", 1, ("input_tensor",), "attention.output.LayerNorm"),
            SiteSpec("output.dropout", "output", 1, ("input_tensor",), "output.LayerNorm")),
)
"""The candidate layouts, in the order they are tried (see the module docstring)."""

STRUCTURALLY_TESTED_MODEL_TYPES: tuple[str, ...] = (
    "qwen3_moe", "qwen2_moe", "mixtral", "gemma", "phi3", "olmo", "olmo2", "olmoe", "granite",
    "granitemoe", "smollm3", "stablelm", "starcoder2", "cohere", "glm", "glm4", "deepseek_v3", "gpt_neox",
    "gpt_neo", "gpt_bigcode", "falcon", "opt", "bloom", "codegen", "camembert",
    "marian", "blenderbot-small", "mvp", "led", "fsmt", "pegasus", "blenderbot", "m2m_100", "bigbird_pegasus",
    "speech_to_text", "nllb-moe",
    "deit", "vit_mae", "vit_msn", "ijepa", "dpt", "vivit", "videomae", "audio-spectrogram-transformer", "dinov2",
    "dinov2_with_registers", "wav2vec2", "hubert", "wavlm", "data2vec-audio", "sew", "unispeech", "unispeech-sat",
    "siglip_vision_model", "idefics3_vision", "aimv2_vision_model", "pixtral",
    "qwen3_next", "qwen3_5_text", "apertus", "mpt",
)
"""Model types recognized by structure whose tiny random models the tests check against adapters
added by hand in float64."""

_ATTRIBUTE = "_adapter_fused_structure"


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (tuple, list)) and value else value


class _Recording:
    """Hooks on the candidates' modules: calls counted in every layer, tensors kept from the first layer of
    each kind (``_kinds``)."""

    def __init__(self) -> None:
        self.calls: Counter[int] = Counter()
        self.inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.outputs: dict[int, Any] = {}
        self.handles: list[Any] = []
        self.hooked: set[int] = set()
        self.kept: set[int] = set()

    @staticmethod
    def _keep(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, (tuple, list)):  # only positions are read back: a plain tuple will do
            return tuple(_Recording._keep(v) for v in value)
        return value

    def watch(self, module: nn.Module, keep: bool) -> None:
        """Count the calls of ``module``; with ``keep`` (from any candidate watching it), keep its tensors."""
        key = id(module)
        if keep:
            self.kept.add(key)
        if key in self.hooked:
            return
        self.hooked.add(key)

        def before(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.calls[key] += 1
            if key in self.kept:
                self.inputs[key] = (self._keep(args), {k: self._keep(v) for k, v in kwargs.items()})

        def after(_: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if key in self.kept:
                self.outputs[key] = self._keep(_first(output))

        self.handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        self.handles.append(module.register_forward_hook(after))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _tolerance(*tensors: torch.Tensor) -> float:
    eps = max((torch.finfo(t.dtype).eps for t in tensors if t.is_floating_point()), default=0.0)
    return max(4 * eps, 1e-6)


def _mismatch(actual: Any, terms: list[Any], what: str) -> str | None:
    """None when ``actual`` equals the sum of ``terms`` (tensors) within the tolerance, else why not."""
    tensors = [t for t in (actual, *terms) if isinstance(t, torch.Tensor)]
    if len(tensors) != 1 + len(terms):
        return f"{what}: a value was not recorded"
    if any(t.numel() != actual.numel() for t in terms):
        return f"{what}: shapes differ ({', '.join(str(tuple(t.shape)) for t in tensors)})"
    flat = [t.reshape(-1).double() for t in tensors]
    expected = sum(flat[1:])
    scale = sum(float(t.norm()) for t in flat[1:]) + 1e-30
    error = float((flat[0] - expected).norm()) / scale
    if error > _tolerance(*tensors):
        return f"{what} (off by {error:.2g} of the terms' size)"
    return None


_LABELS = {"attention": "attention", "cross": "cross-attention", "ffn": "feed-forward"}


def _sites(stack: ModelLayout, layer: nn.Module | None = None) -> list[tuple[str, SiteSpec]]:
    """A stack's sites in the order they run, with the names the reasons use; in ``layer`` where given
    (``SiteSpec.in_layer``)."""
    return [(_LABELS[name], spec if layer is None else spec.in_layer(layer)) for name, spec in stack.sites.items()]


def _kinds(stack: ModelLayout, layers: nn.ModuleList) -> list[int]:
    """The positions of the first layer of each kind: layers whose sites differ in a hybrid model (one
    with full attention, one with linear attention), else only the first layer."""
    seen: dict[tuple[SiteSpec, ...], int] = {}
    for position, layer in enumerate(layers):
        seen.setdefault(tuple(site for _, site in _sites(stack, layer)), position)
    return sorted(seen.values())


def _check(stack: ModelLayout, layers: nn.ModuleList, record: _Recording) -> str | None:
    """Why ``stack`` does not describe ``layers`` (given a forward pass recorded), or None."""
    for position, layer in enumerate(layers):
        called = record.calls[id(layer)]
        for _, site in _sites(stack, layer):
            output, residual = get_submodule(layer, site.output), get_submodule(layer, site.residual) if site.residual else None
            if output is None or record.calls[id(output)] != called:
                return f"in layer {position}, {site.output} ran {record.calls[id(output)] if output else 0} times " \
                       f"in {called} calls"
            if residual is not None and record.calls[id(residual)] < called:
                return f"in layer {position}, {site.residual} ran {record.calls[id(residual)]} times in {called} calls"
    for position in _kinds(stack, layers):
        why = _sums(stack, layers[position], record)
        if why is not None:
            return why if position == 0 else f"in layer {position}, {why}"
    return None


def _sums(stack: ModelLayout, layer: nn.Module, record: _Recording) -> str | None:
    """Why the tensors recorded in ``layer`` do not add up as ``stack`` says, or None."""
    if id(layer) not in record.inputs:
        return "the layer did not run"
    sites = _sites(stack, layer)
    args, kwargs = record.inputs[id(layer)]
    x, y = call_argument(args, kwargs, 0, ("hidden_states",)), record.outputs.get(id(layer))

    def site_parts(site: SiteSpec) -> tuple[Any, Any, Any]:
        h = record.outputs.get(id(get_submodule(layer, site.output)))
        r_args, r_kwargs = record.inputs.get(id(get_submodule(layer, site.residual)), ((), {}))  # type: ignore[arg-type]
        r = call_argument(r_args, r_kwargs, site.residual_position, site.residual_keywords)
        p = record.outputs.get(id(get_submodule(layer, site.residual_plus))) if site.residual_plus else None
        return h, r, p

    def combined(site: SiteSpec, h: Any, r: Any, p: Any, what: str) -> tuple[Any, str | None]:
        terms = [h, r] + ([p] if site.residual_plus else [])
        if not all(isinstance(t, torch.Tensor) for t in terms):
            return None, f"{what}: a value was not recorded"
        if site.norm is None:
            return sum(terms[1:], terms[0]), None
        norm = get_submodule(layer, site.norm)
        n_args, n_kwargs = record.inputs.get(id(norm), ((), {}))
        why = _mismatch(call_argument(n_args, n_kwargs, 0, _NORM_INPUT), terms, f"the input of {site.norm} is not {what}")
        return record.outputs.get(id(norm)), why

    attention = sites[0][1]
    h, r, p = site_parts(attention)
    why = _mismatch(r, [x], f"the input of {attention.residual} is not the layer input")
    if why:
        return why
    result, why = combined(attention, h, r, p, f"{attention.output} output + residual")
    if why:
        return why
    previous = "attention"
    for name, site in sites[1:]:
        h, r, p = site_parts(site)
        terms = [r] + ([p] if site.residual_plus else [])
        what = f"{site.residual} input" + (f" + {site.residual_plus} output" if p is not None else "")
        why = _mismatch(sum(terms[1:], terms[0]) if all(isinstance(t, torch.Tensor) for t in terms)
                        else None, [result], f"{what} (the {name} residual) is not the {previous} block's result")
        if why:
            return why
        result, why = combined(site, h, r, p, f"{site.output} output + residual")
        if why:
            return why
        previous = name
    return _mismatch(y, [result], f"the layer output is not {sites[-1][1].output} output + residual")


def _stacks(layout: Architecture, base: nn.Module) -> list[tuple[ModelLayout, nn.ModuleList]] | None:
    """Each stack of ``layout`` with its layer list in ``base``; None when a stack is absent or its first
    layer lacks a module of its sites (the cross-attention site included)."""
    found = []
    for stack in layout.stacks:
        lists = find_layers(base, stack.layers)  # type: ignore[arg-type]
        if not lists or missing_modules(lists[0][1][0], *(site for _, site in _sites(stack))):
            return None
        if len(layout.stacks) == 1 and _beside(base, lists[0][0]) is not None:
            return None  # an encoder-decoder model's encoder alone would leave out the decoder
        found.append((stack, lists[0][1]))
    return found


def _beside(base: nn.Module, path: str) -> str | None:
    """The name of the module beside the one holding the layers at ``path`` whose layers a one-stack
    layout would leave out (``_PAIRED``), or None."""
    paired = _PAIRED.get(path.split(".", 1)[0])
    return paired if paired is not None and isinstance(getattr(base, paired, None), nn.Module) else None


def _ints(config: object, *names: str) -> list[int] | None:
    """The config's values at ``names`` if all are positive ints, else None."""
    values = [getattr(config, name, None) for name in names]
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        return values  # type: ignore[return-value]
    return None


def _signal_shape(name: str, config: object) -> tuple[int, ...] | None:
    """The shape of one short example of a model input other than token ids, from its config, or None
    where the config does not say it:

    - ``input_features``: (1, 16 frames, ``input_feat_per_channel * input_channels``) (Speech2Text);
    - ``pixel_values``: (1, channels, size, size), or (1, ``num_frames``, channels, size, size) for video;
    - ``input_values``: a spectrogram (1, ``max_length``, ``num_mel_bins``) (AST), or raw audio long enough
      for eight frames out of the ``conv_kernel``/``conv_stride`` feature encoder (wav2vec 2.0).
    """
    if name == "input_features":
        found = _ints(config, "input_feat_per_channel")
        channels = getattr(config, "input_channels", 1)
        return (1, 16, found[0] * channels) if found and isinstance(channels, int) and channels > 0 else None
    if name == "pixel_values":
        size = getattr(config, "image_size", None)
        size = tuple(size) if isinstance(size, (list, tuple)) and len(size) == 2 else (size, size)
        channels = getattr(config, "num_channels", 3)
        if not all(isinstance(v, int) and v > 0 for v in (*size, channels)):
            return None
        frames = _ints(config, "num_frames")
        return (1, *(frames or []), channels, *size)  # type: ignore[return-value]
    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if isinstance(kernels, (list, tuple)) and isinstance(strides, (list, tuple)) and len(kernels) == len(strides):
        length = 8
        for kernel, stride in zip(reversed(kernels), reversed(strides)):
            length = (length - 1) * stride + kernel
        return (1, length)
    found = _ints(config, "max_length", "num_mel_bins")
    return (1, *found) if found else None


def _dummy_batch(base: nn.Module) -> dict[str, torch.Tensor]:
    """One short example for the check's forward pass: token ids, or for a model that reads none, random
    values of the shape ``_signal_shape`` gives; the decoder's token ids where it has one."""
    config = getattr(base, "config", None)
    vocab = getattr(config, "vocab_size", None)
    vocab = vocab if isinstance(vocab, int) and vocab > 8 else 8
    device = next((p.device for p in base.parameters()), torch.device("cpu"))
    ids = torch.tensor([[5, 3, 7, 2, 6, 4]], device=device) % (vocab - 1) + 1
    batch = {"input_ids": ids}
    try:
        parameters = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return batch
    signal = None if "input_ids" in parameters else next(
        ((name, shape) for name in ("input_features", "pixel_values", "input_values")
         if name in parameters and (shape := _signal_shape(name, config)) is not None), None)
    if signal is not None:
        name, shape = signal
        generator = torch.Generator().manual_seed(0)
        dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), torch.float32)
        batch = {name: torch.randn(shape, generator=generator).to(device, dtype)}
    if "use_cache" in parameters:
        batch["use_cache"] = False  # type: ignore[assignment]
    if "decoder_input_ids" in parameters:  # an encoder-decoder model: its decoder reads the encoder's output
        batch["decoder_input_ids"] = ids[:, :4]
    return batch


_Candidate = tuple[Architecture, list[tuple[ModelLayout, nn.ModuleList]]]


def _run(base: nn.Module, candidates: list[_Candidate], batch: dict[str, Any]) -> _Recording:
    """Run ``base`` on ``batch`` (evaluation mode, no gradients), recording every candidate's modules."""
    record = _Recording()
    training = {m: m.training for m in base.modules()}
    try:
        for _, stacks in candidates:
            for stack, layers in stacks:
                kinds = _kinds(stack, layers)
                for position, layer in enumerate(layers):
                    record.watch(layer, keep=position in kinds)
                    for _, site in _sites(stack, layer):
                        for module in filter(None, (get_submodule(layer, path) for path in site.paths)):
                            record.watch(module, keep=position in kinds)
        base.eval()
        with torch.no_grad():
            base(**batch)
    finally:
        record.remove()
        for module, mode in training.items():
            module.training = mode
    return record


def find_by_structure(model: nn.Module, base: nn.Module, model_type: object, refuse: str, hint: str) -> Architecture:
    """The structural layout of ``base`` (``model``'s base model), checked on a dummy forward pass and
    named after ``model_type``; when none fits, ValueError: ``refuse``, each candidate's reason, ``hint``."""
    cached = base.__dict__.get(_ATTRIBUTE)
    if isinstance(cached, Architecture):
        return cached
    reasons: list[str] = []
    candidates: list[_Candidate] = []
    for layout in STRUCTURAL_LAYOUTS:
        stacks = _stacks(layout, base)
        if stacks is not None:
            candidates.append((layout, stacks))
    if not candidates:
        lists = find_layers(base, LAYERS)
        where = f"its layer class {type(lists[0][1][0]).__name__} has the modules of no known layout" if lists else \
            f"it has no non-empty layer list at {', '.join(LAYERS)}"
        paired = _beside(base, lists[0][0]) if lists else None
        if paired is not None:
            top = lists[0][0].split(".", 1)[0]
            where = (f"the layers of its {top} ({type(lists[0][1][0]).__name__}) and of its {paired} match no "
                     f"layout of both, and adapters in the {top} alone would leave out the {paired}")
        raise ValueError(f"{refuse}. Such a model is not recognized: {where}; {hint}")
    if any(p.is_meta for p in base.parameters()):
        layout = candidates[0][0]
        warnings.warn(f"adapter_fused: the parameters of {type(model).__name__} are on the meta device, so its "
                      f"layers cannot be checked on a forward pass; assuming the {layout.name}", stacklevel=3)
        chosen = layout
    else:
        batch = _dummy_batch(base)
        try:
            record = _run(base, candidates, batch)
        except Exception as error:
            given = ", ".join(k for k, v in batch.items() if torch.is_tensor(v))
            raise ValueError(f"{refuse}. Its layers were not recognized: a forward pass of the base model on a "
                             f"dummy batch (of {given}), run to check the layout, failed "
                             f"({type(error).__name__}: {error}); {hint}") from error
        for layout, stacks in candidates:
            why = next((f"{stack.layers[0]}: {why}" if len(stacks) > 1 else why for stack, layers in stacks
                        if (why := _check(stack, layers, record)) is not None), None)
            if why is None:
                chosen = layout
                break
            reasons.append(f"as a {layout.name}: {why}")
        else:
            raise ValueError(f"{refuse}. Such a model is not recognized: its layer class "
                             f"{type(candidates[0][1][0][1][0]).__name__} matches no known layout on a forward pass "
                             f"({'; '.join(reasons)}); {hint}")
    arch = replace(chosen, model_types=(str(model_type),) if model_type else ())
    base.__dict__[_ATTRIBUTE] = arch
    return arch
