"""The sample language model ``samples/tiny_lm/``: corpus, tokenizer, training, token files.

Run through ``python samples/generate.py --only tiny_lm``. Nothing is downloaded:

- **Corpus**: text that ships with the Python interpreter: the pydoc topics (``pydoc_data.topics``,
  the language reference in English) and every docstring of at least ``MIN_DOC`` characters in the
  standard library (tests, IDLE and site-packages left out), read with ``ast``: no module is
  imported or run. Documents are in a fixed order (topics by key, docstrings by file path and
  position); every ``HOLDOUT``-th one is held out for evaluation and never seen by the tokenizer or
  the model. The corpus depends on the Python version (recorded in the manifest).
- **Tokenizer**: byte-level BPE (GPT-2 style), ``VOCAB`` ids including ``<|endoftext|>`` (id 0:
  bos/eos, between documents) and ``<pad>`` (id 1), trained with ``tokenizers`` on the training
  documents and saved as a Hugging Face fast tokenizer (``tokenizer.json`` + ``tokenizer_config.json``).
- **Model**: ``LlamaForCausalLM`` (``CONFIG``: 4 layers, hidden 128, gated SiLU FFN 512, 4 query / 2
  key-value heads, tied embeddings), AdamW on random ``SEQ``-token windows of the training stream,
  linear warm-up then cosine decay, float32, one thread, deterministic algorithms.
- **Token files**: ``tiny_lm_calib.safetensors`` (``N_CALIB`` windows of the training stream) and
  ``tiny_lm_eval.safetensors`` (``N_EVAL`` windows of the held-out stream), ``input_ids`` and
  ``attention_mask`` int64 ``(n, SEQ)``; every ``PAD_EVERY``-th row is cut to a random length and
  right-padded (``<pad>``, mask 0) so that padding handling is exercised.

Perplexity is ``exp`` of the mean next-token negative log-likelihood over the positions t ≥ 1 whose
``attention_mask`` is 1, ``PPL = exp(-(1/N) Σ log p(x_t | x_<t))``; the unigram baseline uses the
add-one-smoothed token frequencies of the training stream, ``p(v) = (c_v + 1) / (Σ c + V)``, on the
same positions.
"""

from __future__ import annotations

import ast
import math
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread: the same merges every run

import torch
from safetensors.torch import save_file

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SEED = 0
VOCAB = 4096
SEQ = 128
MIN_DOC = 200  # shorter docstrings are mostly one-line summaries that repeat the signature
# installed packages, and test suites and their data (not prose)
SKIP_DIRS = ("site-packages", "idlelib", "lib2to3", "test", "tests", "__pycache__")
HOLDOUT = 10
N_CALIB = 128
N_EVAL = 64
PAD_EVERY = 4
BATCH = 16
STEPS = 800
LR = 3e-3
WARMUP = 50
EOS, PAD = "<|endoftext|>", "<pad>"
CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=SEQ,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=1,
)


def stdlib_sources() -> list[tuple[str, Path]]:
    """``(relative path, file)`` of the standard library's ``.py`` files outside SKIP_DIRS, sorted by path."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path]] = []
    for root, dirs, files in os.walk(lib):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]  # pruned, so site-packages is never listed
        found += [((Path(root) / f).relative_to(lib).as_posix(), Path(root) / f) for f in files if f.endswith(".py")]
    return sorted(found)


def documents() -> list[tuple[str, str]]:
    """``(name, text)`` of every corpus document: pydoc topics by key, then docstrings by file and position."""
    import pydoc_data.topics

    docs = [(f"topic:{k}", v.strip()) for k, v in sorted(pydoc_data.topics.topics.items())]
    for rel, path in stdlib_sources():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # a broken stdlib file is not our corpus
            continue
        for node in ast.walk(tree):  # breadth-first: the module's docstring, then its classes and functions
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) >= MIN_DOC:
                    docs.append((f"doc:{rel}:{getattr(node, 'name', '')}", text))
    return docs


def split(docs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts): every HOLDOUT-th document is held out."""
    train = [t for i, (_, t) in enumerate(docs) if i % HOLDOUT != HOLDOUT // 2]
    held = [t for i, (_, t) in enumerate(docs) if i % HOLDOUT == HOLDOUT // 2]
    return train, held


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with VOCAB ids, wrapped as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=[EOS, PAD],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=None, model_max_length=SEQ
    )


def stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """The documents' token ids concatenated, each followed by EOS: ``(n_tokens,)`` int64."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    # the backend tokenizer directly: documents are longer than model_max_length, which is fine here
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def windows(tokens: torch.Tensor, n: int, seed: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``n`` evenly spaced SEQ-token windows of ``tokens``; every PAD_EVERY-th is cut short and right-padded."""
    starts = torch.linspace(0, len(tokens) - SEQ, n).long()
    ids = torch.stack([tokens[s : s + SEQ] for s in starts.tolist()])  # (n, SEQ)
    mask = torch.ones_like(ids)
    g = torch.Generator().manual_seed(seed)
    for row in range(PAD_EVERY - 1, n, PAD_EVERY):
        length = int(torch.randint(SEQ // 4, SEQ, (1,), generator=g))
        ids[row, length:] = pad_id
        mask[row, length:] = 0
    return {"input_ids": ids.contiguous(), "attention_mask": mask.contiguous()}


@torch.no_grad()
def mean_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Mean next-token negative log-likelihood (nats) over the targets whose attention_mask is 1."""
    logits = model(**batch).logits[:, :-1].double()  # (n, SEQ-1, V)
    target = batch["input_ids"][:, 1:]
    keep = batch["attention_mask"][:, 1:].bool()
    nll = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="mean")
    return float(nll)


def unigram_nll(train: torch.Tensor, batch: dict[str, torch.Tensor], vocab: int) -> float:
    """Mean NLL of the add-one-smoothed unigram model of ``train`` on the same targets as :func:`mean_nll`."""
    logp = torch.log((torch.bincount(train, minlength=vocab).double() + 1) / (len(train) + vocab))
    keep = batch["attention_mask"][:, 1:].bool()
    return float(-logp[batch["input_ids"][:, 1:][keep]].mean())


def lr_at(step: int) -> float:
    """Linear warm-up over WARMUP steps, then cosine decay to a tenth of LR at STEPS."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, STEPS - WARMUP)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_model(
    tokens: torch.Tensor, eval_batch: dict[str, torch.Tensor], steps: int = STEPS, log: Callable[[str], None] = print
) -> tuple[torch.nn.Module, float]:
    """Train ``LlamaForCausalLM(CONFIG)`` on random SEQ-token windows of ``tokens``; returns (model, last train loss)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, attn_implementation="sdpa", **CONFIG))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]  # norms: no weight decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(SEED + 1)
    recent: list[float] = []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, len(tokens) - SEQ, (BATCH,), generator=g)
        x = torch.stack([tokens[s : s + SEQ] for s in starts.tolist()])  # (BATCH, SEQ)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if (step + 1) % 100 == 0 or step + 1 == steps:
            model.eval()
            log(f"  step {step + 1}/{steps}: train loss {sum(recent) / len(recent):.3f} (last 50), "
                f"eval loss {mean_nll(model, eval_batch):.3f}")
            model.train()
    return model.eval(), sum(recent) / len(recent)


def build(out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Write ``out_dir/tiny_lm/`` and the two token files; returns the manifest entry."""
    torch.use_deterministic_algorithms(True)
    t0_wall, t0_cpu = time.perf_counter(), time.process_time()
    train_texts, held_texts = split(documents())
    tokenizer = train_tokenizer(train_texts)
    pad_id = tokenizer.convert_tokens_to_ids(PAD)
    train_tokens, held_tokens = stream(tokenizer, train_texts), stream(tokenizer, held_texts)
    calib = windows(train_tokens, N_CALIB, SEED + 2, pad_id)
    evals = windows(held_tokens, N_EVAL, SEED + 3, pad_id)
    log(f"tiny_lm: corpus {len(train_tokens):,} train / {len(held_tokens):,} held-out tokens "
        f"({len(train_texts)} / {len(held_texts)} documents)")
    model, train_loss = train_model(train_tokens, evals, log=log)
    wall, cpu = time.perf_counter() - t0_wall, time.process_time() - t0_cpu

    eval_loss, unigram = mean_nll(model, evals), unigram_nll(train_tokens, evals, VOCAB)
    target = out_dir / "tiny_lm"
    shutil.rmtree(target, ignore_errors=True)  # no stale files from an older recipe
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    save_file(calib, str(out_dir / "tiny_lm_calib.safetensors"))
    save_file(evals, str(out_dir / "tiny_lm_eval.safetensors"))
    log(f"tiny_lm: train loss {train_loss:.3f}, eval loss {eval_loss:.3f} (perplexity {math.exp(eval_loss):.1f}; "
        f"unigram {math.exp(unigram):.1f}); {wall:.0f} s wall, {cpu:.0f} s CPU")
    return {
        "architecture": "transformers:LlamaForCausalLM",
        "params": sum(p.numel() for p in model.parameters()),
        "train_loss": round(train_loss, 4),
        "eval_loss": round(eval_loss, 4),
        "eval_perplexity": round(math.exp(eval_loss), 2),
        "unigram_eval_perplexity": round(math.exp(unigram), 2),
        "train_tokens": len(train_tokens),
        "heldout_tokens": len(held_tokens),
        "python": sys.version.split()[0],
    }
