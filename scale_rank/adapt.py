"""Attach a method's adapters to a model: the one-call entry point for users with their own loop."""
from __future__ import annotations

from torch import nn

from .config import MethodConfig, method_config
from .inject import attach_adapters, find_sites
from .layer import AdaptiveLoRALayer
from .methods import Method, build_method


def adapt(model: nn.Module, method: str | MethodConfig, total_steps: int | None = None,
          targets: list[str] | str | None = None, trainable: list[str] | None = None,
          **method_options) -> Method:
    """Freeze `model`, wrap its target modules in adapters initialised for `method`, return the method.

    `method` is a name ("adalora", ...) with `method_options`, or a typed MethodConfig.
    """
    config = method if isinstance(method, MethodConfig) else method_config(method, **method_options)
    strategy = build_method(config, total_steps)
    sites = find_sites(model, targets)
    n_layers = max(site.layer_index for site in sites) + 1

    def make_layer(site) -> AdaptiveLoRALayer:
        layer = AdaptiveLoRALayer(site.module, strategy.capacity(site, n_layers), scale=1.0,
                                  dropout=config.dropout, site=site.name, layer_index=site.layer_index,
                                  kind=site.kind)
        layer.method = strategy.name
        strategy.init_layer(layer)
        return layer

    attach_adapters(model, sites, make_layer, trainable)
    return strategy
