"""Hand-written LoRA: a frozen linear layer plus a trainable low-rank update.

             x (…, in)
             ├───────────────────────────┐
             │                           dropout
             │                           A: (r, in)   kaiming-uniform
      W: (out, in), frozen               B: (out, r)  zeros
             │                           × scale      (alpha / r, or alpha / √r with rsLoRA)
             └──────────── + ────────────┘
                           y (…, out)

    y = x Wᵀ + scale · (dropout(x) Aᵀ) Bᵀ   ≡   x (W + scale · B A)ᵀ   without dropout

B starts at zero, so the model is unchanged at step 0. A and B stay in fp32
when W is bf16 (the adapter's input is cast at the matmul), as PEFT does.

Adapter files use PEFT's layout, so `PeftModel.from_pretrained` reads them as
they are: `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_{A,B}.weight` and `adapter_config.json`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


log = logging.getLogger(__name__)

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` (no bias) with a LoRA update. Keeps the base's `weight` name."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear supports bias-free linear layers only (all of Higgs Audio's)")
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), frozen
        self.weight.requires_grad_(False)
        dev = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=torch.float32)
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scale = lora_scale(r, alpha, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._undo: tuple | None = None  # merge_in_place's record of the bits the merge cannot give back
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        """x (…, in) -> (…, out)."""
        if self.merged:
            return F.linear(x, self.weight)  # (…, out)
        if isinstance(self.dropout, nn.Identity):
            return self.base_plus_update(x, first_factor(x, self.lora_A.weight))
        return self.base_plus_update(x, self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype)))

    @property
    def factored(self) -> bool:
        """y = base_plus_update(x, x Aᵀ) exactly: unmerged, no dropout (callers may compute x Aᵀ themselves)."""
        return not self.merged and isinstance(self.dropout, nn.Identity)

    def base_plus_update(self, x, a):
        """x Wᵀ (…, out) + the update from A's output a (…, r), for x (…, in)."""
        # scale the (…, r) factor, not the (…, out) product: r columns to multiply instead of out, forward and
        # backward. The same numbers when scale is a power of two (alpha = 2r, the default), else within rounding.
        u = (a * self.scale).reshape(-1, a.shape[-1])  # (N, r)
        y = F.linear(x.reshape(-1, x.shape[-1]), self.weight)  # (N, out): the same mm as on (…, in)
        if y.dtype != self.lora_B.weight.dtype:  # a bf16 base (or autocast): B's product cast to y's dtype
            y = y + self.lora_B(u).to(y.dtype)
        else:
            # y += u Bᵀ inside the matmul (addmm_, beta = 1): no (N, out) product to allocate, fill and add. y is
            # linear's output, kept by no backward, and 2-D, not a view: in place costs no copy in backward.
            y.addmm_(u, self.lora_B.weight.t())
        return y.view(*x.shape[:-1], y.shape[-1])

    def merge(self, name: str = "") -> None:
        """W ← merged_weight(W, A, B, scale), in place and without a copy of W. A second merge does nothing."""
        if self.merged:
            return
        self._undo = merge_in_place(self.weight, self.lora_A.weight, self.lora_B.weight, self.scale, name or "layer")
        self.merged = True

    def unmerge(self) -> None:
        """Restore the exact base weight of merge time (bitwise, any dtype). A, B and scale must be unchanged."""
        if not self.merged:
            return
        unmerge_in_place(self.weight, self.lora_A.weight, self.lora_B.weight, self.scale, self._undo)
        self._undo = None
        self.merged = False

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}"


def first_factor(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (…, in) @ weight (r, in)ᵀ in weight's dtype -> (…, r) (ops.swiglu_lora_in: the same after a SwiGLU)."""
    return F.linear(x.to(weight.dtype), weight)


def shared_input(layers, x: torch.Tensor) -> list[torch.Tensor]:
    """[layer(x) for layer in layers] for linears reading the same x (q, k, v; gate, up). When every one is an
    unmerged LoRALinear without dropout, their A factors run as one matmul with A stacked (Σr, in): x is read
    once instead of once per layer, forward and backward, and its gradient from the A's comes as one (…, in)
    tensor instead of one per layer (the numbers differ from separate matmuls only by rounding)."""
    fusable = all(isinstance(m, LoRALinear) and m.factored for m in layers)
    if not fusable or len({m.lora_A.weight.dtype for m in layers}) > 1:
        return [m(x) for m in layers]
    a = first_factor(x, torch.cat([m.lora_A.weight for m in layers]))  # (…, Σr)
    parts = a.split([m.r for m in layers], dim=-1)  # (…, r) each
    return [m.base_plus_update(x, part) for m, part in zip(layers, parts)]


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    """The update's scale: alpha / r, or alpha / √r with rsLoRA (PEFT's `use_rslora`)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


@torch.no_grad()
def merged_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, name: str) -> torch.Tensor:
    """W + scale · B @ A, computed in fp32 and cast once to W's dtype: the one merge (a new tensor here, for the
    export of a base folder; merge_in_place for a model). w (out, in), a (r, in), b (out, r). Refuses a misfit
    or non-finite update."""
    _check_fit(w, a, b, name)
    delta = _delta(a, b, scale)  # (out, in)
    _check_finite(delta, name)
    return (w.float() + delta).to(w.dtype)


# ----------------------------------------------------------------------------- merging a model in place
# W ← cast(W + Δ) with Δ = scale·B@A in fp32, one block of rows at a time: no second copy of W and temporaries of
# MERGE_BLOCK elements. Undoing it computes cast(W' − Δ) from the same Δ (the same rows, the same matmul), which
# gives W back except where the cast lost information (mostly W' in a larger binade than W: 4-6% of the
# elements when |Δ| is about |W| / 30, more for larger updates); the merge records W's bits at exactly those
# positions (flat index, value), compared as bits (so -0.0 and NaNs come back too): about 12% of W's bytes
# instead of a clone. A row block of B@A equals the same rows of the whole product (the sum over r does not
# depend on the rows), so the merged W equals merged_weight's bit for bit (tests/test_lora.py).

MERGE_BLOCK = 1 << 20


def _check_fit(w, a, b, name):
    if (b.shape[0], a.shape[1]) != tuple(w.shape) or b.shape[1] != a.shape[0]:
        raise ValueError(f"{name}: LoRA update {(b.shape[0], a.shape[1])} != weight {tuple(w.shape)}")


def _check_finite(delta, name):
    if not torch.isfinite(delta).all():
        raise ValueError(f"{name}: LoRA update is not finite; refusing to merge")


def _delta(a, b, scale):
    return (b.float() @ a.float()) * scale  # (rows, in)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@torch.no_grad()
def merge_in_place(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, name: str) -> tuple:
    """W (out, in) ← merged_weight(W, A, B, scale) in place; returns the undo record for unmerge_in_place:
    (flat indices, W's values there). Refuses a misfit or non-finite update with W as it was."""
    _check_fit(w, a, b, name)
    rows = max(1, MERGE_BLOCK // max(1, w.shape[1]))
    index_dtype = torch.int32 if w.numel() < 2**31 else torch.int64
    idx, vals = [], []
    for i in range(0, w.shape[0], rows):
        delta = _delta(a, b[i:i + rows], scale)  # (rows, in)
        try:
            _check_finite(delta, name)
        except ValueError:
            unmerge_in_place(w, a, b, scale, _undo_record(w, idx, vals, index_dtype), upto=i)
            raise
        block = w[i:i + rows]
        merged = (block.float() + delta).to(w.dtype)
        lost = (_bits((merged.float() - delta).to(w.dtype)) != _bits(block)).nonzero()  # (k, 2) row, col
        idx.append((lost[:, 0] + i) * w.shape[1] + lost[:, 1])
        vals.append(block[lost[:, 0], lost[:, 1]])
        block.copy_(merged)
    return _undo_record(w, idx, vals, index_dtype)


def _undo_record(w, idx, vals, index_dtype) -> tuple:
    if not idx:
        return torch.zeros(0, dtype=index_dtype, device=w.device), w.new_zeros(0)
    return torch.cat(idx).to(index_dtype), torch.cat(vals)


@torch.no_grad()
def unmerge_in_place(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, undo: tuple,
                     upto: int | None = None) -> None:
    """Undo merge_in_place (of rows [0, upto) when given): W back bit for bit."""
    rows = max(1, MERGE_BLOCK // max(1, w.shape[1]))
    for i in range(0, w.shape[0] if upto is None else upto, rows):
        block = w[i:i + rows]
        block.copy_((block.float() - _delta(a, b[i:i + rows], scale)).to(w.dtype))
    idx, vals = undo
    idx = idx.long()
    w[idx // w.shape[1], idx % w.shape[1]] = vals


def matches(path: str, pattern: str) -> bool:
    """PEFT's rule: a pattern names a module when it is its path or a dotted suffix of it."""
    return path == pattern or path.endswith("." + pattern)


def apply_lora(model: nn.Module, targets=None, r: int = 16, alpha: float = 32.0,
               dropout: float = 0.0, rslora: bool = False) -> list[str]:
    """Freeze every parameter of `model` and wrap the targeted linears in LoRALinear.

    Returns the wrapped module paths. A pattern that matches no linear layer is an error.
    """
    targets = list(targets or DEFAULT_TARGETS)
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = [
        (path, m) for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(matches(path, t) for t in targets)
    ]
    unused = [t for t in targets if not any(matches(path, t) for path, _ in chosen)]
    if unused:
        raise ValueError(f"LoRA target pattern(s) {unused} match no linear layer of the model")
    for path, lin in chosen:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, LoRALinear(lin, r, alpha, dropout, rslora))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA on %d layers: trainable %s / total %s (%.3f%%)",
             len(chosen), f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return [path for path, _ in chosen]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    """Merge every LoRA layer in place; on a refused layer, the layers merged before it are unmerged again."""
    done = []
    try:
        for path, m in lora_layers(model).items():
            if not m.merged:
                m.merge(path)
                done.append(m)
    except BaseException:
        for m in done:
            m.unmerge()
        raise


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.unmerge()


# --------------------------------------------------------------------------- adapter files

def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (fp32, contiguous, on CPU)."""
    out = {}
    for path, m in lora_layers(model).items():
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = m.lora_A.weight.detach().float().cpu().contiguous()
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = m.lora_B.weight.detach().float().cpu().contiguous()
    return out


def adapter_config(model: nn.Module, targets, dropout: float, base_model: str) -> dict:
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("the model has no LoRA layers")
    first = layers[0]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": list(targets),
        "use_rslora": first.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "base_model_name_or_path": base_model,
    }


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read `adapter_config.json` and `adapter_model.safetensors` from a folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path}: cannot read adapter config: {e}") from e
    for field in ("peft_type", "r", "lora_alpha", "target_modules"):
        if field not in cfg:
            raise ValueError(f"{cfg_path}: field {field!r} is missing")
    if cfg["peft_type"] != "LORA":
        raise ValueError(f"{cfg_path}: peft_type is {cfg['peft_type']!r}, expected 'LORA'")
    if not weights_path.exists():
        raise FileNotFoundError(f"{weights_path}: adapter weights are missing")
    return cfg, load_file(str(weights_path))


@torch.no_grad()
def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy PEFT-named LoRA tensors into the model's LoRA layers, strictly."""
    layers = lora_layers(model)
    expected = set()
    for path, m in layers.items():
        for part, param in (("lora_A", m.lora_A.weight), ("lora_B", m.lora_B.weight)):
            key = f"{PEFT_PREFIX}{path}.{part}.weight"
            expected.add(key)
            if key not in tensors:
                raise KeyError(f"{source}: tensor {key!r} is missing")
            t = tensors[key]
            if tuple(t.shape) != tuple(param.shape):
                raise ValueError(f"{source}: tensor {key!r} has shape {tuple(t.shape)}, "
                                 f"model expects {tuple(param.shape)}")
            param.copy_(t)
    unknown = sorted(set(tensors) - expected)
    if unknown:
        raise KeyError(f"{source}: {len(unknown)} tensor(s) match no LoRA module of the model, "
                       f"e.g. {unknown[:3]}")


def load_adapter(model: nn.Module, folder: str | Path) -> dict:
    """Apply LoRA as the adapter's config says, then load its weights. Returns the config."""
    cfg, tensors = read_adapter(folder)
    if not lora_layers(model):
        apply_lora(model, cfg["target_modules"], cfg["r"], cfg["lora_alpha"],
                   cfg.get("lora_dropout", 0.0), cfg.get("use_rslora", False))
    load_adapter_tensors(model, tensors, source=str(Path(folder) / "adapter_model.safetensors"))
    return cfg


# --------------------------------------------------------------------------- base tensors trained in full

TRAINED_TENSORS = "trained_tensors.safetensors"  # beside adapter_model.safetensors (v3 --train-audio-embedding)


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter that is not a LoRA A/B, under its model name (fp32, contiguous, on CPU).

    named_parameters lists a tied parameter once, so a tied matrix (v3's audio embedding = audio head) is ONE
    tensor here, never an embedding plus a head copy."""
    lora = {id(p) for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)}
    return {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in lora}


def read_trained_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """The trained base tensors saved beside an adapter ({} when the adapter has none)."""
    from safetensors.torch import load_file

    path = Path(folder) / TRAINED_TENSORS
    return load_file(str(path)) if path.exists() else {}


@torch.no_grad()
def load_trained_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = TRAINED_TENSORS) -> None:
    """Copy trained base tensors into the model's parameters of the same names, strictly (every name known, every
    shape equal). The copy goes into the existing Parameter, so whatever shares it (a tie) still shares it."""
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        if name not in params:
            raise KeyError(f"{source}: tensor {name!r} names no parameter of the model")
        if tuple(t.shape) != tuple(params[name].shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, model expects "
                             f"{tuple(params[name].shape)}")
        params[name].copy_(t)
