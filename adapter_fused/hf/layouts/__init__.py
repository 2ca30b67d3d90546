"""Where the adapter sites are in each supported transformers architecture, and how a model's layers are found.

Every supported layer has two sites, after the attention block and after the feed-forward block;
decoder layers of encoder-decoder models have a third, after the cross-attention block.
At a site the layer combines the sub-block output ``h`` with the block residual ``x``, either as
``LN(h + x)`` (post-LN: BERT, BART, DeBERTa) or as ``h + x`` (pre-LN: GPT-2, Llama, T5, CLIP, Whisper).
A site is described by module paths relative to the layer (``SiteSpec``):

- ``output``: the module whose output is ``h`` (a tensor, or a tuple whose first item is ``h``);
- ``residual``: a module that receives ``x`` as an argument before ``output`` runs, with the
  argument's position and the keyword names it may be passed under; None where the layer adds no
  residual at that site (Phi's feed-forward block, which runs beside the attention block);
- ``norm``: the layer norm of ``LN(h + x)``, or None for pre-LN layers. For the models AdapterHub
  hooks through its model interface (Gemma 2 and 3, ModernBERT) it is the norm AdapterHub gives that
  site, so the same placements compute the same numbers.
- ``swapped``: the adapter reads ``x`` and takes ``h`` as its residual (ALBERT's attention site, where
  AdapterHub calls its adapter that way round).
- ``output_alternatives``: modules that take ``output``'s place in layers that lack it, in hybrid models
  whose layers differ in their token mixer (Qwen3-Next's ``linear_attn`` layers beside its ``self_attn``
  ones): each layer's site is after the first of them that the layer has.

The adapters hook these modules; no base module is replaced and no parameter renamed.

A model may have several layer stacks (``ModelLayout``, one per stack): an encoder and a decoder
(BART, T5, Whisper), or CLIP's text and vision towers. Layers are numbered across the stacks in
order, as AdapterHub numbers them (encoder layers first, then decoder layers), and each stack has
its own sites (a T5 decoder block has its feed-forward block at ``layer.2``, after cross-attention).
A stack's ``cross`` site (after cross-attention) exists in the layers that have its output module:
every decoder layer of BART or T5, the BERT layers built with ``add_cross_attention``. It holds an
adapter when the config asks for one (``AdapterConfig.cross_adapter``, AdapterHub's option of that
name) or, where the layout says ``cross_with_attention`` (BERT-style decoders, whose cross-attention
block ends in the same module class as their self-attention block), wherever the attention site does,
as AdapterHub places them.

Models are recognized in three ways, in this order. A layout registered with
``register_model_layout`` for the model's class or type. A model type listed in ``ARCHITECTURES``
(``known``). Any other model by the structure of its layers (``structure``): the first candidate
layout whose modules the first layer has and whose sums a forward pass on a dummy batch confirms
(pre-norm, parallel-block, sandwich-norm and post-norm layers under several naming schemes, hybrid
layers with softmax or linear attention, and BART-style encoder-decoder models). At run time, a site whose placement needs the residual ``x`` and
whose residual module did not run before its output module in the same call raises RuntimeError rather
than compute wrong numbers. Dropout applied by the layer to a sub-block output (Phi-3, StableLM, BART)
acts on the adapted output, which changes nothing in evaluation mode.

Modules, each importing only those before it:

- ``spec``: ``SiteSpec``, ``ModelLayout``, ``Architecture``, ``ModelLayer`` and the helpers that read
  module paths and call arguments;
- ``known``: ``ARCHITECTURES``, the layouts of the model types recognized by name;
- ``structure``: recognition by structure (``STRUCTURAL_LAYOUTS``, checked on a forward pass);
- ``lookup``: registration (``register_model_layout``) and finding a model's layout and layers
  (``find_architecture``, ``model_layers``, ``hidden_size``, ``layer_widths``).
"""

from .known import ARCHITECTURES, SUPPORTED_MODEL_TYPES
from .lookup import (
    embedding_module,
    find_architecture,
    hidden_size,
    layer_widths,
    model_layers,
    register_model_layout,
    resolve_layers,
    unregister_model_layout,
)
from .spec import (
    Architecture,
    ModelLayer,
    ModelLayout,
    SiteSpec,
    base_model,
    call_argument,
    find_layers,
    get_submodule,
    missing_modules,
)

__all__ = [
    "ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "Architecture",
    "ModelLayer",
    "ModelLayout",
    "SiteSpec",
    "base_model",
    "call_argument",
    "embedding_module",
    "find_architecture",
    "find_layers",
    "get_submodule",
    "hidden_size",
    "layer_widths",
    "missing_modules",
    "model_layers",
    "register_model_layout",
    "resolve_layers",
    "unregister_model_layout",
]
