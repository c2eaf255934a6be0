"""What a training checkpoint holds and how it is restored: the adapter, AdamW's moments and step
counts, the trainer's state and every rank's RNG. `checkpoint.py` makes the folder atomic and
verified; this module decides its contents.

    training_files(model, optimizer, adapter_cfg, trainer_state) -> {file name: tensors | JSON bytes}
    load_training_state(folder, model, optimizer) -> trainer_state   (one verified read, then restore)

    output/checkpoint-300/
      adapter_model.safetensors   PEFT keys: base_model.model.layers.3.self_attn.q_proj.lora_A.weight, …
      adapter_config.json         peft_type LORA, r, lora_alpha, lora_dropout, target_modules, use_rslora, …
      optimizer.safetensors       AdamW moments by parameter name
      optimizer.json              AdamW hyper-parameters and step counters
      trainer_state.json          step, epoch, sampler position, scheduler, resolved config, RNG states
      manifest.json               written last by checkpoint.save: {"format": 2, "step": 300, "block_bytes": …,
                                  "files": {name: {bytes, sha256: [one per block]}}} (manifest.py)

A run stopped at step k and resumed ends bitwise identical (on CPU) to an uninterrupted run: the tests
compare the adapter and the optimizer moments with torch.equal. tests/test_peft_compat.py loads the adapter
with peft.PeftModel.from_pretrained onto a HiggsAudioModel (same outputs, 1e-6; bitwise on the make train
checkpoint) and loads what PEFT saves back into higgs_min; it runs where peft is installed (make test and
make bench install it).
"""

from __future__ import annotations

import json
from pathlib import Path

from higgs_min.atomic import json_bytes
from higgs_min.manifest import CheckpointError, read_verified, tensors_from_safetensors


def rng_state() -> dict:
    import random

    import numpy as np
    import torch

    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().numpy().tobytes().hex(),
        "cuda": [s.numpy().tobytes().hex() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    as_tensor = lambda h: torch.frombuffer(bytearray(bytes.fromhex(h)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(as_tensor(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([as_tensor(h) for h in state["cuda"]])


def training_files(model, optimizer, adapter_cfg: dict, trainer_state: dict) -> dict:
    """Everything a checkpoint holds: name -> tensors (safetensors) or JSON bytes."""
    from higgs_min.lora import TRAINED_TENSORS, adapter_state_dict, trained_tensors

    names = {p: n for n, p in model.named_parameters() if p.requires_grad}
    moments, scalars, groups = {}, {}, []
    for g in optimizer.param_groups:
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [names[p] for p in g["params"]]})
        for p in g["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if value.dim() == 0:
                    scalars.setdefault(names[p], {})[key] = value.item()
                else:
                    moments[f"{names[p]}.{key}"] = value.detach().cpu().contiguous()
    full = trained_tensors(model)  # base tensors trained in full (v3 --train-audio-embedding), else none
    return {
        **({TRAINED_TENSORS: full} if full else {}),
        "adapter_model.safetensors": adapter_state_dict(model),
        "adapter_config.json": json_bytes(adapter_cfg),
        "optimizer.safetensors": moments,
        "optimizer.json": json_bytes({"param_groups": groups, "scalars": scalars}),
        "trainer_state.json": json_bytes(trainer_state),
    }


def load_training_state(folder: str | Path, model, optimizer) -> dict:
    """Verify `folder`, restore adapter weights and optimizer state; return trainer_state.

    One pass: each file is read once, hashed while it is read, and restored from those bytes
    (`read_verified`). A resume hashes the chosen checkpoint once on rank 0: choosing it
    (checkpoint.latest_valid, or the check of --resume PATH) keeps the verified read, and this load
    takes it (a file changed since is hashed again); the other ranks hash it here.
    """
    folder = Path(folder)
    data = read_verified(folder)
    return restore_training_state(folder, model, optimizer, {
        name: tensors_from_safetensors(buf, str(folder / name)) if name.endswith(".safetensors") else bytes(buf)
        for name, buf in data.items()})


def restore_training_state(folder: Path, model, optimizer, files: dict) -> dict:
    """files: name -> tensors (safetensors files) or bytes (JSON files), as `training_files` wrote them."""
    import torch

    from higgs_min.lora import TRAINED_TENSORS, load_adapter_tensors, load_trained_tensors, trained_tensors

    load_adapter_tensors(model, files["adapter_model.safetensors"], source=str(folder / "adapter_model.safetensors"))
    saved, want = files.get(TRAINED_TENSORS, {}), sorted(trained_tensors(model))
    if sorted(saved) != want:  # the set trained in full must be this run's (e.g. --train-audio-embedding)
        raise ValueError(f"{folder}: base tensors trained in full {sorted(saved) or 'none'}, this run trains "
                         f"{want or 'none'}")
    load_trained_tensors(model, saved, source=str(folder / TRAINED_TENSORS))
    moments = files["optimizer.safetensors"]
    meta = json.loads(files["optimizer.json"])
    names = {p: n for n, p in model.named_parameters() if p.requires_grad}
    state, groups, index = {}, [], 0
    for g, saved in zip(optimizer.param_groups, meta["param_groups"]):
        ids = []
        for p in g["params"]:
            n = names[p]
            entry = {k: torch.tensor(v, dtype=torch.float32) for k, v in meta["scalars"].get(n, {}).items()}
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if f"{n}.{key}" in moments:
                    entry[key] = moments[f"{n}.{key}"]
            if entry:
                state[index] = entry
            ids.append(index)
            index += 1
        if saved["params"] != [names[p] for p in g["params"]]:
            raise CheckpointError(f"{folder}/optimizer.json: parameter names differ from the model's LoRA parameters")
        group = {k: v for k, v in saved.items() if k != "params"}
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append({**group, "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return json.loads(files["trainer_state.json"])
