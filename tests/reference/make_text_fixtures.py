"""Deterministic LM data-pipeline fixtures for the Rust port of goodfire-ai/spd (@3f0bb61).

Run:  source /work/ref/venv/bin/activate
      export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
      python /work/ref/lm/data-fixtures/make.py
Writes everything next to this file. Uses the reference's own spd.data.tokenize_and_concatenate.
"""

import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OUT = Path(__file__).resolve().parent
EOS = "<|endoftext|>"
N_CTX = 16
N_CHUNK_STORIES = 120


# ----------------------------------------------------------------------------------------------
# 1. corpus
# ----------------------------------------------------------------------------------------------
NAMES = ["Mia", "Tom", "Lily", "Ben", "Sam", "Zoë", "Max", "Anna", "Leo", "Mia", "Tom", "Lily"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
COUNT = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
ANIMALS = ["cat", "dog", "bird", "fish", "frog", "rabbit", "fox"]
PLACES = ["the park", "the café", "school", "the river", "the garden", "the market", "home"]
VERBS = ["ran", "jumped", "sang", "walked", "played", "laughed", "danced", "read"]
FOODS = ["apples", "bread", "soup", "cake", "pears", "crêpes"]
ADJS = ["happy", "sleepy", "big", "little", "naïve", "brave", "quiet"]


def make_story(rng: random.Random) -> str:
    a, b = rng.choice(NAMES), rng.choice(NAMES)
    day = rng.choice(DAYS)
    templates = [
        lambda: f"On {day}, {a} went to {rng.choice(PLACES)}.",
        lambda: f"{a} {rng.choice(VERBS)} with {b}.",
        lambda: f"{a} had a {rng.choice(ADJS)} {rng.choice(ANIMALS)}.",
        lambda: f'"Can we count?" asked {b}. "{", ".join(COUNT[: rng.randint(2, 5)]).capitalize()}!"',
        lambda: f"They counted {' '.join(COUNT[: rng.randint(3, 7)])}.",
        lambda: f"{a} ate {rng.randint(2, 12)} {rng.choice(FOODS)} at {rng.randint(1, 12)} o'clock.",
        lambda: f"It was {rng.choice(DAYS)} and the {rng.choice(ANIMALS)} was {rng.choice(ADJS)}!",
        lambda: f"Why did {b} {rng.choice(['cry', 'smile', 'hide', 'wait'])}? Nobody knew.",
        lambda: f"{b} didn't like {rng.choice(FOODS)}, but {a} did.",
        lambda: f"The End.",
    ]
    n = rng.randint(2, 5)
    sents = [rng.choice(templates[:-1])() for _ in range(n)]
    if rng.random() < 0.15:
        sents.append(templates[-1]())
    sep = "\n" if rng.random() < 0.1 else " "
    return sep.join(sents)


def make_corpus() -> tuple[list[str], list[str]]:
    rng = random.Random(1234)
    stories = [make_story(rng) for _ in range(300)]
    return stories[:250], stories[250:]


def write_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"story": t}, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------
# 2. tokenizer
# ----------------------------------------------------------------------------------------------
def train_tokenizer(train: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())  # no unk_token: byte-level covers every input
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, clean_up_tokenization_spaces=False
    )
    tdir = OUT / "tokenizer"
    hf.save_pretrained(str(tdir))
    return tdir


# ----------------------------------------------------------------------------------------------
def main() -> None:
    train, test = make_corpus()
    write_jsonl(OUT / "train.jsonl", train)
    write_jsonl(OUT / "test.jsonl", test)

    tdir = train_tokenizer(train)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tdir))
    assert tokenizer.eos_token == EOS, tokenizer.eos_token
    facts: dict = {
        "tokenizer_class": type(tokenizer).__name__,
        "vocab_size_len": len(tokenizer),
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "unk_token_id": tokenizer.unk_token_id,
        "clean_up_tokenization_spaces": tokenizer.clean_up_tokenization_spaces,
    }

    # 3. round trip
    strings = [
        "Hello world.",
        "  Mia ran to the park.  ",
        f"Tom counted one two three.{EOS}Lily sang.",
        EOS,
        f"x{EOS} y {EOS}{EOS}z",
        "On Monday, 42 cats ate 7 fish at 10 o'clock!",
        "She went to the café with Zoë.",
        'Wow!? "Yes," said Ben... (3.14)',
        "line one\nline two\ttabbed",
        "naïve 日本 🙂 ENDOFTEXT <|endoftext",
    ]
    rt = []
    for s in strings:
        ids = tokenizer.encode(s, add_special_tokens=False)
        dec = tokenizer.decode(ids)
        rt.append({"text": s, "ids": ids, "decoded": dec, "roundtrip_equal": dec == s})
    (OUT / "roundtrip.json").write_text(json.dumps(rt, ensure_ascii=False, indent=1))

    # 4. chunking with the reference function
    sys.path.insert(0, "/work/ref/spd")
    import inspect

    import numpy as np
    from datasets import Dataset

    import spd.data as sd

    texts = train[:N_CHUNK_STORIES]
    (OUT / "chunk_texts.json").write_text(json.dumps(texts, ensure_ascii=False, indent=1))
    facts["tokenize_and_concatenate_num_proc_default"] = (
        inspect.signature(sd.tokenize_and_concatenate).parameters["num_proc"].default
    )

    def run(to_lower: bool, num_proc: int) -> list[list[int]]:
        ds = Dataset.from_list([{"story": t} for t in texts])
        out = sd.tokenize_and_concatenate(
            ds, tokenizer, column_name="story", max_length=N_CTX, add_bos_token=False,
            num_proc=num_proc, to_lower=to_lower,
        )
        return [r.tolist() for r in out["input_ids"]]

    results = {}
    for to_lower in (False, True):
        ids = run(to_lower, num_proc=1)
        results[to_lower] = ids
        name = f"chunks_lower_{str(to_lower).lower()}.json"
        (OUT / name).write_text(json.dumps({"n_ctx": N_CTX, "input_ids": ids}))
    facts["n_sequences_num_proc1"] = len(results[False])
    facts["lower_true_equals_lower_false"] = results[True] == results[False]

    # independent re-derivation of the num_proc=1 result (one map batch = all 120 texts)
    def emulate(batch: list[str]) -> list[list[int]]:
        full = EOS.join(batch)
        cl = (len(full) - 1) // 20 + 1
        chunks = [full[i * cl : (i + 1) * cl] for i in range(20)]
        toks = [t for c in chunks for t in tokenizer.encode(c, add_special_tokens=False)]
        nb = len(toks) // N_CTX
        return np.array(toks[: nb * N_CTX]).reshape(nb, N_CTX).tolist()

    facts["emulation_matches_num_proc1"] = emulate(texts) == results[False]
    full = EOS.join(texts)
    cl = (len(full) - 1) // 20 + 1
    chunked_tokens = [
        t for i in range(20) for t in tokenizer.encode(full[i * cl : (i + 1) * cl], add_special_tokens=False)
    ]
    whole_tokens = tokenizer.encode(full, add_special_tokens=False)
    facts["full_text_len_chars"] = len(full)
    facts["full_text_len_utf8_bytes"] = len(full.encode("utf-8"))
    facts["chunk_length_chars"] = cl
    facts["n_tokens_chunked"] = len(chunked_tokens)
    facts["n_tokens_whole_text"] = len(whole_tokens)
    facts["n_eos_in_tokens"] = chunked_tokens.count(tokenizer.eos_token_id)
    boundaries = []
    for i in range(1, 20):
        a, b = full[(i - 1) * cl : i * cl], full[i * cl : (i + 1) * cl]
        left, right = a[-12:], b[:12]
        joined = left + right
        boundaries.append({
            "boundary": i, "char_index": i * cl, "left": left, "right": right,
            "tokens_split": [tokenizer.convert_ids_to_tokens(tokenizer.encode(left, add_special_tokens=False)),
                             tokenizer.convert_ids_to_tokens(tokenizer.encode(right, add_special_tokens=False))],
            "tokens_joined": tokenizer.convert_ids_to_tokens(tokenizer.encode(joined, add_special_tokens=False)),
        })
    facts["chunk_boundaries"] = boundaries
    # first divergence between chunked and whole-text tokenization
    k = next((j for j, (x, y) in enumerate(zip(chunked_tokens, whole_tokens)) if x != y), None)
    if k is not None:
        facts["first_divergence_token_index"] = k
        facts["first_divergence_chunked"] = tokenizer.convert_ids_to_tokens(chunked_tokens[max(0, k - 3) : k + 5])
        facts["first_divergence_whole"] = tokenizer.convert_ids_to_tokens(whole_tokens[max(0, k - 3) : k + 5])

    # the real LM path uses num_proc=10 (default): datasets shards the 120 rows into 10
    # contiguous shards of 12 and each shard is one map batch
    ids10 = run(False, num_proc=10)
    (OUT / "chunks_lower_false_numproc10.json").write_text(json.dumps({"n_ctx": N_CTX, "input_ids": ids10}))
    facts["n_sequences_num_proc10"] = len(ids10)
    per_shard = [s for j in range(10) for s in emulate(texts[12 * j : 12 * (j + 1)])]
    facts["num_proc10_equals_10_contiguous_shards_of_12"] = per_shard == ids10
    facts["num_proc10_equals_num_proc1"] = ids10 == results[False]

    (OUT / "facts.json").write_text(json.dumps(facts, ensure_ascii=False, indent=1))
    print(json.dumps({k: v for k, v in facts.items() if k != "chunk_boundaries"}, ensure_ascii=False, indent=1))
    for r in rt:
        print(r["roundtrip_equal"], repr(r["text"]), r["ids"])


if __name__ == "__main__":
    main()
