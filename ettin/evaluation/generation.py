"""Text from a bidirectional ModernBERT by iterative unmasking (masked diffusion sampling, MDLM /
LLaDA; Nie et al. 2025, Algorithm 4-5), and the decoder's ``generate`` as the baseline.

The sequence is ``[CLS] prompt [MASK] x length [SEP]`` (an encoder row as trained). The masks are cut
into blocks of ``block_length`` filled left to right (LLaDA's semi-autoregressive sampling; one block
of ``length`` is plain MDLM sampling); each block gets ``steps / blocks`` steps. At every step the
model predicts every position; each masked position of the current block proposes its argmax (with
``temperature`` > 0: the argmax of logits / T plus Gumbel noise, i.e. a sample), and the step
unmasks its share of the block (the block's masks spread evenly over its steps, the first steps
taking one more when they do not divide) among them:

* ``low_confidence``: those whose proposal has the highest probability (the rest stay masked:
  "low-confidence remasking");
* ``random``: a uniformly random subset (MDLM's ancestral order).

[MASK] and [PAD] are never proposed. All randomness comes from one ``torch.Generator`` seeded with
``seed``, so the same model, prompt and settings give the same text.

Models: an ettin run directory, a checkpoint folder, or a Hugging Face ModernBERT folder or hub id
(``ettin.evaluation.models.resolve_model``); the model runs as ettin's ``ModernBert`` loaded from
the folder. An export made from an MDLM run carries its generation settings in config.json
(``ettin_generation``, written by ettin.model.export), which are the defaults here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ettin.objectives import UNMASKING_DEFAULTS

REMASKING = ("low_confidence", "random")


@dataclass(frozen=True)
class GenerationSettings:
    length: int = UNMASKING_DEFAULTS["length"]  # tokens generated
    steps: int = UNMASKING_DEFAULTS["steps"]  # forward passes in all
    block_length: Optional[int] = UNMASKING_DEFAULTS["block_length"]  # None: one block of ``length``
    remasking: str = UNMASKING_DEFAULTS["remasking"]
    temperature: float = UNMASKING_DEFAULTS["temperature"]
    seed: int = 0

    def __post_init__(self) -> None:
        if self.length < 1 or self.steps < 1:
            raise ValueError(f"length={self.length} and steps={self.steps} must be >= 1")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking={self.remasking!r}: choose one of {', '.join(REMASKING)}")
        if self.block_length is not None and self.block_length < 1:
            raise ValueError(f"block_length={self.block_length} must be >= 1")
        if self.steps < self.blocks:
            raise ValueError(f"steps={self.steps} is fewer than the {self.blocks} blocks of "
                             f"{self.block} tokens: give at least one step per block")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")

    @property
    def block(self) -> int:
        return min(self.block_length or self.length, self.length)

    @property
    def blocks(self) -> int:
        return math.ceil(self.length / self.block)


def unmask_counts(masks: int, steps: int) -> list[int]:
    """How many of a block's ``masks`` each of its ``steps`` unmasks: evenly, the first ones one more."""
    base, extra = divmod(masks, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def unmask(logits_fn: Callable[[torch.Tensor], torch.Tensor], prompt: list[int], *, mask_id: int,
           cls_id: int, sep_id: int, never: tuple[int, ...], settings: GenerationSettings,
           on_step: Optional[Callable[[torch.Tensor], None]] = None) -> list[int]:
    """The ``settings.length`` generated ids after ``prompt`` (ids, without special tokens).

    ``logits_fn``: ids [T] -> logits [T, V] (one sequence, bidirectional); ``never``: ids never
    proposed (besides [MASK]); ``on_step``: called with the sequence after every step."""
    s = settings
    generator = torch.Generator().manual_seed(s.seed)
    x = torch.tensor([cls_id, *prompt] + [mask_id] * s.length + [sep_id], dtype=torch.long)
    start = 1 + len(prompt)
    steps_per_block = unmask_counts(s.steps, s.blocks)  # steps of each block, spread evenly
    for block, block_steps in enumerate(steps_per_block):
        lo, hi = start + block * s.block, min(start + (block + 1) * s.block, start + s.length)
        for count in unmask_counts(hi - lo, block_steps):
            logits = logits_fn(x).double()
            logits[:, [mask_id, *never]] = -math.inf
            if s.temperature > 0:  # Gumbel-max: a sample of softmax(logits / T)
                uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
                proposal = (logits / s.temperature - torch.log(-torch.log(uniform))).argmax(-1)
            else:
                proposal = logits.argmax(-1)
            if s.remasking == "low_confidence":
                score = logits.softmax(-1).gather(1, proposal[:, None]).squeeze(1)
            else:
                score = torch.rand(len(x), generator=generator, dtype=torch.float64)
            selectable = torch.zeros(len(x), dtype=torch.bool)
            selectable[lo:hi] = x[lo:hi] == mask_id
            score = score.masked_fill(~selectable, -math.inf)
            chosen = score.topk(count).indices  # ties: the lower position first (topk is stable on CPU)
            x[chosen] = proposal[chosen]
            if on_step is not None:
                on_step(x.clone())
    return x[start:start + s.length].tolist()


def until_end(ids: list[int], end_ids: tuple[int, ...]) -> list[int]:
    """``ids`` up to the first end-of-text id (a generated [SEP] ends the text)."""
    for i, token in enumerate(ids):
        if token in end_ids:
            return ids[:i]
    return ids


# ---------------------------------------------------------------------------------------------------
# Models


class GenerationError(ValueError):
    """A model or setting that cannot generate; the message names the fix."""


def model_folder(spec: str | Path) -> Path:
    """The Hugging Face folder of a run directory, a checkpoint folder, or a folder / hub id."""
    from ettin.evaluation.models import resolve_model
    from ettin.store.rundir import RunDir

    path = Path(spec)
    if (path / "meta.json").exists() and path.parent.name == "checkpoints":
        run = path.parent.parent
        folder = RunDir(run).checkpoint_export(path.name)
        if not (folder / "config.json").exists():
            from ettin.model.export import export_checkpoint

            export_checkpoint(path, folder)
        return folder
    return resolve_model(spec).path


def saved_settings(folder: Path) -> dict:
    """The generation settings an MDLM export records (``ettin_generation`` in config.json)."""
    return json.loads((folder / "config.json").read_text()).get("ettin_generation", {})


@dataclass
class Unmasker:
    """A bidirectional model and its tokenizer, ready to generate."""

    model: torch.nn.Module  # ettin.model.modernbert.ModernBert, or transformers' ModernBertForMaskedLM
    tokenizer: object
    defaults: dict

    @classmethod
    def load(cls, spec: str | Path) -> "Unmasker":
        from transformers import AutoTokenizer

        from ettin.model.hub import load_hf

        folder = model_folder(spec)
        config = json.loads((folder / "config.json").read_text())
        if config.get("is_causal") or config.get("model_type") == "modernbert-decoder":
            raise GenerationError(f"{spec} is a decoder; unmasking needs a bidirectional ModernBERT "
                                  "(give the decoder as --compare)")
        model = load_hf(folder, attn_implementation="sdpa").eval()
        return cls(model, AutoTokenizer.from_pretrained(folder), saved_settings(folder))

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        with torch.no_grad():
            return self.model(input_ids=ids[None].to(device)).logits[0].float().cpu()

    def generate(self, prompt: str, settings: GenerationSettings, **kwargs) -> str:
        t = self.tokenizer
        prompt_ids = t(prompt, add_special_tokens=False)["input_ids"]
        never = tuple(i for i in (t.pad_token_id, t.cls_token_id, t.unk_token_id) if i is not None)
        ids = unmask(self.logits, prompt_ids, mask_id=t.mask_token_id, cls_id=t.cls_token_id,
                     sep_id=t.sep_token_id, never=never, settings=settings, **kwargs)
        return t.decode(until_end(ids, (t.sep_token_id,)))

    def settings(self, **given) -> GenerationSettings:
        """The export's recorded settings, overridden by those ``given`` (None: not given)."""
        fields = {**self.defaults, **{k: v for k, v in given.items() if v is not None}}
        return GenerationSettings(**{k: v for k, v in fields.items() if k in GenerationSettings.__dataclass_fields__})


def decoder_generate(spec: str | Path, prompt: str, length: int) -> str:
    """The baseline: a decoder's transformers ``generate``, greedy, ``length`` new tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder(spec)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if tokenizer.sep_token_id is not None and ids[0, -1] == tokenizer.sep_token_id:
        ids = ids[:, :-1]  # the prompt goes on: no end-of-text after it
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=length, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

