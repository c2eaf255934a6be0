"""An independent formulation of the chat layout for tests: one conversation to per-position lists,
position by position (the encoder as it was before the plan/materialize split). `materialize(plan(...))`
must give exactly these tensors."""
import json
from pathlib import Path

import numpy as np
import torch

from higgs_min.data import IGNORE_INDEX, Sample, audio_stream


def reference_sample(encoder, line: bytes, folder: Path, index: int) -> Sample:
    sp, K, C = encoder.ids, encoder.K, encoder.C
    ids, labels, codes, alabels, ain, aout, shapes = [], [], [], [], [], [], []

    def add(tokens, supervised):
        for t in tokens:
            ids.append(t)
            labels.append(t if supervised else IGNORE_INDEX)
            codes.append([0] * K)
            alabels.append([IGNORE_INDEX] * K)
            ain.append(False)
            aout.append(False)

    def add_audio(c, role):
        inp, lab = audio_stream(c, bos=C, eos=C + 1)
        out = role == "assistant"
        for s in range(inp.shape[1]):
            ids.append(sp["audio_out" if out else "audio_in"])
            labels.append(IGNORE_INDEX)
            codes.append(inp[:, s].tolist())
            alabels.append(lab[:, s].tolist() if out else [IGNORE_INDEX] * K)
            ain.append(not out)
            aout.append(out)
        shapes.append((role, tuple(c.shape)))

    add([sp["begin_of_text"]], False)
    for msg in json.loads(line)["messages"]:
        role, content, sup = msg["role"], msg["content"], msg["role"] == "assistant"
        add([sp["start_header"]] + encoder.text(role) + [sp["end_header"]] + encoder.text("\n\n"), False)
        for item in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if item["type"] == "text":
                add(encoder.text(item["text"]), sup)
            else:
                c = torch.from_numpy(np.load(folder / item["codes"]).astype(np.int64))
                add([sp["audio_out_bos" if sup else "audio_bos"]], sup)
                add_audio(c, role)
                add([sp["audio_eos"]], sup)
        add([sp["eot"]], sup)
    t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt)  # noqa: E731
    return Sample(index, t(ids), t(labels), t(codes).view(-1, K), t(alabels).view(-1, K),
                  t(ain, torch.bool), t(aout, torch.bool), shapes)


SAMPLE_FIELDS = ("input_ids", "text_labels", "audio_codes", "audio_labels", "audio_in_mask", "audio_out_mask")


def assert_same_sample(a: Sample, b: Sample):
    assert a.index == b.index and a.stream_shapes == b.stream_shapes
    for f in SAMPLE_FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f
