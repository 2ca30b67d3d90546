"""Everything that knows AdapterHub's names: ``convert`` reads its configs, weights, heads and
composition blocks in this package's terms; ``accelerate`` makes a model built with AdapterHub's
``adapters`` package run the fused kernel. Neither imports ``adapters`` before it is needed."""
