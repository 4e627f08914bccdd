"""How many prompts answers of any length gain over LAMA's single-token convention, per data set
and tokenizer, for the masked reading (n masks) and the causal one (prefix + answer).

    python -m bench.answer_gains --tokenizer PATH [--tokenizer PATH ...] \\
        --ckbc ../shared/data/conceptnet_ckbc/test.txt [--lama DATA_DIR] [--max-tokens 5]

``--tokenizer``: a directory transformers reads a tokenizer from (a checkpoint's, e.g. a
``save_pretrained`` of bert-base-uncased or gpt2); ``--lama``: LAMA's unzipped ``data/``
folder (ConceptNet, T-REx and Google-RE are counted). Nothing is trained; every count is what
``lamp_jax.data.encode.encode_facts`` (single tokens) and ``lamp_jax.data.answers.
encode_answers`` (any length) keep, with their skip reasons.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def sets(ckbc: str | None, lama: str | None) -> dict[str, list]:
    """Name -> facts of every set asked for."""
    from lamp_jax.data.lama_sets import read_lama_set
    from lamp_jax.data.triples import read_ckbc, triples_to_facts

    out = {}
    if ckbc:
        out[f"CKBC {Path(ckbc).name}"] = triples_to_facts(read_ckbc(ckbc))[0]
    if lama:
        for name in ("conceptnet", "trex", "google_re"):
            out[f"LAMA {name}"] = read_lama_set(lama, lama_set=name).facts
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", action="append", required=True)
    parser.add_argument("--ckbc", default=None)
    parser.add_argument("--lama", default=None)
    parser.add_argument("--max-tokens", type=int, default=5)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from lamp_jax.data.answers import encode_answers
    from lamp_jax.data.encode import encode_facts

    print("| set | tokenizer | reading | sentences | single-token answers | answers of up to "
          f"{args.max_tokens} tokens (gain) | skipped, any length |")
    print("|---|---|---|---|---|---|---|")
    for name, facts in sets(args.ckbc, args.lama).items():
        relations = sorted({f.relation for f in facts})
        sentences = sum(len(f.sentences) for f in facts)
        for path in args.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(path)
            # A tokenizer with a mask token reads prompts as a masked LM, else as a causal one.
            causal = tokenizer.mask_token is None
            if causal:
                single = encode_answers(facts, tokenizer, relations, causal=True,
                                        max_answer_tokens=1)[1].kept
            else:
                single = encode_facts(facts, tokenizer, relations)[1].kept
            report = encode_answers(facts, tokenizer, relations, causal=causal,
                                    max_answer_tokens=args.max_tokens)[1]
            skipped = ", ".join(f"{k} {v}" for k, v in report.skipped.items() if v) or "none"
            print(f"| {name} | {Path(path).name} | {'causal' if causal else 'masked'} | "
                  f"{sentences} | {single} | {report.kept} (+{report.kept - single}) | "
                  f"{skipped} |")


if __name__ == "__main__":
    main()
