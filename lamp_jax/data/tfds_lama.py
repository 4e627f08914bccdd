"""LAMA ConceptNet as a TensorFlow-Datasets builder that needs no TensorFlow.

Why TFDS at all: it gives a versioned, checksummed on-disk cache with metadata that other JAX
tooling (Grain, ``tfds.data_source``) reads directly. Why ``array_record``: TFDS writes and reads
that format (``builder.as_data_source()``) without importing TensorFlow, which is not installed
here; TFRecord output would need it.

One example per masked sentence (``fact_index``/``sentence_index`` keep the jsonl order, because
TFDS shuffles examples on write). There is a single ``"test"`` split, the official file; splitting
into train/dev/test by fact is :mod:`lamp_jax.data.splits`' job.

Where the jsonl comes from, in order: the config's ``jsonl_path``; ``test.jsonl`` in the
download config's ``manual_dir``; else LAMA's archive, fetched by
:func:`~lamp_jax.data.lama_archive.fetch_lama` (the one download of every set) into the TFDS
download directory. The file is read by :func:`~lamp_jax.data.lama_sets.read_lama_set`, as a
training run reads it. :func:`load_tfds_lama` names the config after the file's content hash, so
two different files never share a cache entry.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lamp_jax.data.lama import Fact
from lamp_jax.data.lama_archive import CONCEPTNET_FILE, fetch_lama
from lamp_jax.data.lama_sets import read_lama_set

_VERSION = "1.0.0"


@dataclasses.dataclass
class LamaConceptnetConfig(tfds.core.BuilderConfig):
    """Builder config; ``jsonl_path`` None means manual_dir/test.jsonl or the official download."""

    jsonl_path: str | None = None


def _decode(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class LamaConceptnet(tfds.core.GeneratorBasedBuilder):
    """LAMA ConceptNet cloze sentences, one example per masked sentence, written as array_record."""

    VERSION = tfds.core.Version(_VERSION)
    RELEASE_NOTES = {_VERSION: "LAMA ConceptNet test.jsonl, one example per masked sentence."}
    BUILDER_CONFIGS = [LamaConceptnetConfig(name="official", version=_VERSION)]
    DEFAULT_CONFIG_NAME = "official"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional: put LAMA's data/ConceptNet/test.jsonl into manual_dir as test.jsonl; otherwise "
        "it is downloaded from the LAMA data archive."
    )

    # TFDS' own code_path() touches ``importlib_resources`` (an undeclared dependency of
    # tensorflow-datasets 4.9.x, missing here) for builders defined inside a package; the
    # answer is simply this file.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            description="LAMA ConceptNet probe (Petroni et al. 2019) for LAMP.",
            features=tfds.features.FeaturesDict(
                {
                    "relation": text,
                    "subject": text,
                    "object": text,
                    "masked_sentence": text,
                    "uuid": text,
                    "fact_index": tfds.features.Scalar(dtype=np.int32),
                    "sentence_index": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=None,
            homepage="https://github.com/facebookresearch/LAMA",
        )

    def _jsonl_path(self, dl_manager: Any) -> Path:
        config_path = getattr(self.builder_config, "jsonl_path", None)
        if config_path:
            return Path(config_path)
        try:
            manual = Path(os.fspath(dl_manager.manual_dir)) / "test.jsonl"
        except Exception:  # manual_dir unset: tfds raises instead of returning None
            manual = None
        if manual is not None and manual.is_file():
            return manual
        return fetch_lama("conceptnet", os.fspath(dl_manager.download_dir)) / CONCEPTNET_FILE

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        return {"test": self._generate_examples(self._jsonl_path(dl_manager))}

    def _generate_examples(self, path: Path) -> Any:
        facts = read_lama_set(path).facts
        for f_idx, fact in enumerate(facts):
            for s_idx, sentence in enumerate(fact.sentences):
                yield (
                    f"{f_idx}-{s_idx}",
                    {
                        "relation": fact.relation,
                        "subject": fact.subject,
                        "object": fact.obj,
                        "masked_sentence": sentence,
                        "uuid": fact.uuid,
                        "fact_index": f_idx,
                        "sentence_index": s_idx,
                    },
                )


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def make_builder(
    data_dir: str | os.PathLike[str], jsonl_path: str | os.PathLike[str] | None = None
) -> LamaConceptnet:
    """A :class:`LamaConceptnet` builder for ``jsonl_path`` (None: the official file).

    The config name contains the file's content hash, so a changed file gets a fresh cache entry.
    """
    if jsonl_path is None:
        return LamaConceptnet(data_dir=os.fspath(data_dir))
    path = Path(jsonl_path).resolve()
    config = LamaConceptnetConfig(
        name=f"file_{_file_digest(path)}", version=_VERSION, jsonl_path=str(path)
    )
    return LamaConceptnet(data_dir=os.fspath(data_dir), config=config)


def load_tfds_lama(
    data_dir: str | os.PathLike[str], jsonl_path: str | os.PathLike[str] | None = None
) -> list[Fact]:
    """Build the TFDS dataset if needed and read it back as facts, without TensorFlow.

    Returns the same facts, in the same order, as ``read_lama_set(jsonl_path).facts`` (the
    builder reads strictly and keeps every relation).
    """
    builder = make_builder(data_dir, jsonl_path)
    builder.download_and_prepare(file_format="array_record")
    source = builder.as_data_source(split="test")
    grouped: dict[int, dict[str, Any]] = collections.defaultdict(dict)
    for i in range(len(source)):
        ex = source[i]
        fact = grouped[int(ex["fact_index"])]
        fact.setdefault("sentences", {})[int(ex["sentence_index"])] = _decode(ex["masked_sentence"])
        fact.update(
            relation=_decode(ex["relation"]),
            subject=_decode(ex["subject"]),
            obj=_decode(ex["object"]),
            uuid=_decode(ex["uuid"]),
        )
    facts = []
    for f_idx in sorted(grouped):
        g = grouped[f_idx]
        sentences = tuple(g["sentences"][k] for k in sorted(g["sentences"]))
        facts.append(Fact(g["relation"], g["subject"], g["obj"], sentences, g["uuid"]))
    return facts
