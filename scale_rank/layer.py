"""The fixed-capacity adapter layer.

h = W0 x + scale (B diag(lam)) A dropout(x)

A (r_max x d_in), B (d_out x r_max) and lam (r_max) are parameters whose shapes never change; `active` is
a 0/1 buffer that switches whole components in or out of the forward pass. Methods change ranks only by
editing `active` and the values of lam / A, so every engine and optimizer sees one static parameter set.
Plain LoRA math (LoRA, PRILoRA: lam and active fixed at 1, `gated` False) leaves lam out of the forward, and a
method that keeps lam (and its gradient) at 0 wherever `active` is 0 (`lam_zero_where_off`: IncreLoRA) lets
the forward skip `active`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .versioned import DerivedFrom


def base_dims(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a supported base layer."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D":  # transformers' GPT-2 style layer: weight is (d_in, d_out)
        d_in, d_out = base.weight.shape
        return int(d_in), int(d_out)
    raise TypeError(f"cannot adapt {type(base).__name__}: supported bases are nn.Linear, transformers "
                    "Conv1D and bitsandbytes Linear4bit / Linear8bitLt")


def is_quantized(base: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit base layer."""
    return type(base).__name__ in ("Linear4bit", "Linear8bitLt") or hasattr(base.weight, "quant_state")


def in_backward() -> bool:
    """True while autograd runs a backward pass on this thread (e.g. a checkpointed block recomputing)."""
    return torch._C._current_graph_task_id() != -1


def records_plain_graph() -> bool:
    """True in a forward that records gradients outside activation checkpointing (and any saved-tensor hooks)."""
    return (torch.is_grad_enabled() and not in_backward()
            and torch._C._autograd._top_saved_tensors_default_hooks(False) is None)


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


class AdaptiveLoRALayer(nn.Module):
    """A frozen base linear layer plus a fixed-capacity low-rank adapter.

    Attributes set at attach time: `site` (module name in the model), `layer_index`, `kind` (matrix
    type, e.g. "query"), `method` (the name of the method that made it). What a method computes beyond the
    LoRA update (the orthogonality regularizer, input statistics, dense gradients) it installs as hooks
    (scale_rank.methods.hooks).
    """

    def __init__(self, base: nn.Module, r_max: int, scale: float, dropout: float = 0.0,
                 site: str = "", layer_index: int = 0, kind: str = ""):
        super().__init__()
        d_in, d_out = base_dims(base)
        self.base_layer = base
        self.d_in, self.d_out, self.r_max = d_in, d_out, r_max
        self.site, self.layer_index, self.kind = site, layer_index, kind
        # Float32 whatever the base stores (16-bit, 4-bit packed, 8-bit): adapters train, and 16-bit weights
        # and AdamW moments lose small updates. DeepSpeed casts them to its 16-bit model copy itself (with
        # float32 masters); FSDP1 wraps them apart from a 16-bit base (engine.uniform_dtype_units).
        dtype = torch.float32
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(r_max, d_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r_max, dtype=dtype, device=device))
        self.lora_lam = nn.Parameter(torch.ones(r_max, dtype=dtype, device=device))
        self.register_buffer("active", torch.ones(r_max, dtype=dtype, device=device))
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gated = True  # False: lam and active stay at 1 and the forward skips them (plain LoRA's math)
        self.lam_zero_where_off = False  # True: the method keeps lam and its gradient 0 where `active` is 0
        self.method = ""
        self.merged = False
        self.batched_B: torch.Tensor | None = None  # B x gate made for this forward with every layer's (gates.py)
        self._kept = DerivedFrom(lambda on: None if bool(on.bool().all()) else on.bool().nonzero().flatten())
        self._scale_value = DerivedFrom(float)

    # -- initialisation helpers used by the methods --------------------------------------------------
    def init_gaussian(self, std: float = 0.02) -> None:
        with torch.no_grad():
            nn.init.normal_(self.lora_A, std=std)
            nn.init.normal_(self.lora_B, std=std)

    def init_kaiming_zero(self) -> None:
        """Standard LoRA init: A Kaiming-uniform (a = sqrt 5), B = 0."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def init_plain_lora(self, alpha: float) -> None:
        """A plain LoRA adapter: Kaiming A, B = 0, scale alpha / r_max, lam fixed at 1 and left out of the forward."""
        self.init_kaiming_zero()
        self.lora_lam.requires_grad_(False)
        self.gated = False
        self.scale.fill_(alpha / self.r_max)

    def init_svd_form(self, init: str, lam: float) -> None:
        """Start of AdaLoRA / IncreLoRA adapters (docs/methods.md): "paper" lam = 0 and A, B ~ N(0, 0.02);
        "lora" A Kaiming-uniform, B = 0, every lam = `lam` (the adapter starts as a LoRA adapter)."""
        if init == "paper":
            self.init_gaussian(0.02)
            nn.init.zeros_(self.lora_lam.data)
        else:
            self.init_kaiming_zero()
            nn.init.constant_(self.lora_lam.data, lam)

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return out
        A, B = self.lora_A, self.lora_B
        x_in = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmul picks the dtype itself,
            x_in = x_in.to(A.dtype)  # and no float32 copy of the activation is made and saved
        if self.gated:  # the gate folded into B (d_out x r_max): no operation on the (tokens x r_max) product
            B = self.batched_B if self.batched_B is not None and records_plain_graph() else B * self.gate_factor()
        delta = (x_in @ A.t()) @ B.t()
        return torch.add(out, delta.to(out.dtype), alpha=self.scale_value())

    # Why this form: on a GPU a step of a large frozen base is bound by the host issuing kernels, and the
    # operations a method adds per module are what it costs (bench/op_count.py, bench/gpu_step_profile.py).
    # lam on B rather than on the product: under bf16 autocast the product stays in 16 bits (no float32 copy to
    # cast back before B, no gradient to cast back either); the scale as the addition's alpha: no kernel of its
    # own in the forward.

    def gate_factor(self) -> torch.Tensor:
        """What multiplies B's columns in a gated layer's forward: lam, times `active` while some component is
        off, unless the method keeps lam at 0 there itself (`lam_zero_where_off`; AdaLoRA and SoRA zero lam
        instead of switching components off)."""
        lam = self.lora_lam
        return lam if self.lam_zero_where_off or self.kept_components() is None else lam * self.active.to(lam.dtype)

    def scale_value(self) -> float:
        """The `scale` buffer as a Python number, read back only when the buffer changes (a host sync on a GPU):
        the forward applies it as the output addition's `alpha`, with no kernel of its own."""
        return self._scale_value.of(self.scale)

    def kept_components(self) -> torch.Tensor | None:
        """Indices of the active components (None: all of them), recomputed only when `active` changes, so the
        regularizer (once per micro-batch) needs no boolean-mask indexing (a host sync on a GPU)."""
        return self._kept.of(self.active)

    # -- dense views ---------------------------------------------------------------------------------
    def gate(self) -> torch.Tensor:
        """The effective per-component multiplier lam * active (r_max)."""
        return self.lora_lam.detach() * self.active

    def multiplier(self) -> torch.Tensor:
        """scale * lam * active (r_max), detached, float32: what the forward applies between A and B (the gate on
        B, the scale on the output), as merging and export fold it into the factors."""
        return self.gate().float() * self.scale.float()

    def delta_weight(self) -> torch.Tensor:
        """scale * B diag(gate) A as a (d_out x d_in) matrix (the base layer's orientation for Linear)."""
        A, B = self.lora_A.detach().float(), self.lora_B.detach().float()
        return (B * self.multiplier()) @ A

    def rank(self) -> int:
        return int((self.gate() != 0).sum())

    def merge(self) -> None:
        """Add the adapter into the base weight (and stop applying it separately)."""
        self._shift_base(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        self._shift_base(-1.0)
        self.merged = False

    def _shift_base(self, sign: float) -> None:
        if is_quantized(self.base_layer):
            raise RuntimeError(f"{self.site}: cannot merge into a quantized base; export the PEFT adapter, or "
                               "load the base unquantized (model.quantization=none) to merge")
        if self.merged == (sign > 0):
            raise RuntimeError(f"{self.site}: adapter is already {'merged' if self.merged else 'unmerged'}")
        delta = self.delta_weight()
        weight = self.base_layer.weight
        if not isinstance(self.base_layer, nn.Linear):
            delta = delta.t()  # Conv1D stores (d_in, d_out)
        with torch.no_grad():
            weight.add_(sign * delta.to(weight.dtype))

    def extra_repr(self) -> str:
        return f"site={self.site!r}, d_in={self.d_in}, d_out={self.d_out}, r_max={self.r_max}"
