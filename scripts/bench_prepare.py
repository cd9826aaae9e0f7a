"""Prepare benchmark (issue #12): `llmtrain.data.prepare` against Megatron-LM's tools/preprocess_data.py.

    python scripts/bench_prepare.py --megatron-lm /path/to/Megatron-LM        # generate, train, run both
    python scripts/bench_prepare.py --input docs.jsonl --tokenizer TOKDIR     # your data, ours only

Without --input/--tokenizer it writes (once, cached in --workdir) a deterministic ~100 MB jsonl of
English-like prose, 28.5k documents of 1-6 KB, and trains a byte-level BPE tokenizer (21k vocab) on it.
The text re-mixes the shipped KJV corpus: spans of it cut and joined, a share of its words swapped for
modern English words, invented words (a character-trigram model of its vocabulary, Zipf-distributed,
so the number of distinct words grows with the corpus as in real text) and numbers.

Each tool runs as its own command with the same number of workers (`--workers`, default 2) on the same
input; wall time is the whole command (start-up included), CPU time that of all its processes, and the
load average before each run shows other work on the machine (which inflates wall times). Peak memory:
the largest RSS of any one process, and the peak of the RSS summed over the process tree (sampled every
20 ms; pages shared after fork count once per process). The outputs are compared byte for byte (.bin and .idx). Results go to
WORKDIR/results.json and WORKDIR/results.md, and the table is printed.
"""

import argparse
import json
import lzma
import os
import random
import re
import resource
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KJV = ROOT / "llmtrain" / "corpus" / "kjv.jsonl.xz"
EOS = "<|endoftext|>"


def words(text: str) -> list[str]:
    return text.split()


MODERN = words(
    """people time year way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government number night
point home water room mother area money story fact month lot right study book eye job word business issue
side kind head house service friend father power hour game line end member law car city community name
president team minute idea kid body information back parent face others level office door health person
art war history party result change morning reason research girl guy moment air teacher force education
computer network data software market energy policy report phone email internet video music picture
website price account image research science technology model process design support product account
different important political public social economic national local international federal medical
available possible similar recent current financial environmental digital personal professional
development experience management performance application relationship organization environment
include provide continue develop consider increase require describe receive produce reduce suggest
really actually probably usually finally recently certainly especially simply quickly directly
however although because whether during without against between through around across"""
)
CONTRACTIONS = words("don't can't it's I'm you're we're they're isn't wasn't didn't won't that's there's")
STOP = set(
    words(
        "the and of to in that he shall unto for i his a they be is him not them it with all thou thy was "
        "which my me said but ye their have will thee from as are when this out were upon man by you"
    )
)
WORD = re.compile(r"^([\"'(]*)([A-Za-z]+)([^A-Za-z]*)$")  # opening punctuation, core word, trailing


# ----------------------------------------------------------------------------------------------------
# Corpus and tokenizer


def _pseudo_words(vocab: list[str], n: int, rng: random.Random) -> list[str]:
    """`n` distinct invented words from a character-trigram model of `vocab` (English-looking)."""
    nxt: dict[str, list[str]] = {}
    for w in vocab:
        s = f"^^{w}$"
        for i in range(len(s) - 2):
            nxt.setdefault(s[i : i + 2], []).append(s[i + 2])
    known, out = set(vocab), []
    seen: set[str] = set()
    while len(out) < n:
        ctx, w = "^^", ""
        while len(w) < 14:
            c = rng.choice(nxt[ctx])
            if c == "$":
                break
            w += c
            ctx = ctx[1] + c
        if 3 <= len(w) <= 13 and w not in known and w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _number(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:
        return str(rng.randint(1700, 2030))  # a year
    if kind < 0.6:
        return str(rng.randint(2, 99))
    if kind < 0.8:
        return f"{rng.randint(100, 99_999):,}"
    if kind < 0.9:
        return f"{rng.uniform(0, 100):.1f}%"
    return f"{rng.randint(0, 999)}.{rng.randint(0, 99):02d}"


def make_corpus(path: Path, seed: int = 0, docs: int = 28_500) -> None:
    """Write `docs` documents of 1-6 KB of English-like prose to `path` (jsonl), deterministically."""
    rng = random.Random(seed)
    with lzma.open(KJV, "rt", encoding="utf-8") as f:
        words = [w for line in f for w in json.loads(line)["text"].split()]
    parts = [WORD.match(w) for w in words]
    vocab = sorted({m[2].lower() for m in parts if m})
    # Swap targets, most frequent first: modern words, then invented ones (Zipf over this ranking).
    lexicon = MODERN + _pseudo_words(vocab, 400_000, rng)
    zipf = np.random.default_rng(seed).zipf(1.15, size=4_000_000)
    zipf = zipf[zipf <= len(lexicon)] - 1
    zi = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for d in range(docs):
            target = rng.randint(1000, 6000)
            sentences_left = rng.randint(3, 9)
            pieces: list[str] = []
            size = 0
            while size < target:
                i = rng.randrange(len(words) - 200)
                for j in range(i, i + rng.randint(20, 150)):
                    w, m = words[j], parts[j]
                    r = rng.random()
                    if m and m[2].lower() not in STOP and r < 0.2:
                        if r < 0.02:
                            core = _number(rng)
                        elif r < 0.03:
                            core = rng.choice(CONTRACTIONS)
                        else:
                            core = lexicon[zipf[zi % len(zipf)]]
                            zi += 1
                            if m[2][0].isupper():
                                core = core.capitalize()
                        w = m[1] + core + m[3]
                    if w[-1] in ".?!" and (sentences_left := sentences_left - 1) == 0:
                        w += "\n\n"  # a paragraph break
                        sentences_left = rng.randint(3, 9)
                    pieces.append(w)
                    size += len(w) + 1
                    if size >= target:
                        break
            text = " ".join(pieces).replace("\n\n ", "\n\n").strip()
            out.write(json.dumps({"id": d, "text": text}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def train_tokenizer(corpus: Path, out_dir: Path, vocab_size: int = 21_000) -> None:
    """Byte-level BPE like the shipped tokenizer (scripts/make_corpus.py), in an HF-style directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts():
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    tok.train_from_iterator(texts(), trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    # Megatron's HuggingFaceTokenizer (AutoTokenizer) takes its EOD from here; so does our prepare.
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS}) + "\n"
    )


# ----------------------------------------------------------------------------------------------------
# Measurement


def _tree_rss_kb(root: int) -> int:
    """RSS (kB) summed over `root` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2 :].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
        except (OSError, ValueError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def run_measured(cmd: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Run `cmd`: wall seconds, CPU seconds of the process tree, peak tree RSS (sampled) and the largest
    single-process RSS (rusage), and the load average just before (other work on the machine)."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log or os.devnull, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak = 0
        done = threading.Event()

        def sample():
            nonlocal peak
            while not done.wait(0.02):
                peak = max(peak, _tree_rss_kb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
    if rc:
        tail = log.read_text()[-2000:] if log else ""
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}\n{tail}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "load_before": round(load, 2),
        "peak_tree_rss_mb": round(peak / 1024, 1),
        # ru_maxrss of children is a running maximum: only meaningful when it grew in this run.
        "max_process_rss_mb": round(after.ru_maxrss / 1024, 1)
        if after.ru_maxrss > before.ru_maxrss
        else None,
    }


def count_tokens(prefix: str) -> tuple[int, int]:
    """(documents, tokens) of an indexed dataset, from the .idx header and the .bin size."""
    with open(prefix + ".idx", "rb") as f:
        head = f.read(26)
    itemsize = {8: 2, 4: 4}[head[17]]
    return int.from_bytes(head[18:26], "little"), Path(prefix + ".bin").stat().st_size // itemsize


def run_ours(inp: Path, tok: Path, prefix: Path, workers: int, extra: list[str]) -> dict:
    for s in (".bin", ".idx", ".manifest.json"):
        Path(f"{prefix}{s}").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "llmtrain.data.prepare", f"input={inp}", f"tokenizer={tok}"]
    cmd += [f"output={prefix}", f"workers={workers}", "progress=false", *extra]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    res = run_measured(cmd, env, Path(f"{prefix}.log"))
    res["documents"], res["tokens"] = count_tokens(str(prefix))
    return res


def run_megatron(megatron: Path, inp: Path, tok: Path, prefix: Path, workers: int) -> dict:
    out = f"{prefix}_text_document"
    for s in (".bin", ".idx"):
        Path(out + s).unlink(missing_ok=True)
    cmd = [sys.executable, str(megatron / "tools" / "preprocess_data.py"), "--input", str(inp)]
    cmd += ["--output-prefix", str(prefix), "--tokenizer-type", "HuggingFaceTokenizer"]
    cmd += ["--tokenizer-model", str(tok), "--append-eod", "--workers", str(workers)]
    cmd += ["--log-interval", "100000"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(megatron), os.environ.get("PYTHONPATH")])),
    }
    res = run_measured(cmd, env, Path(f"{prefix}.log"))
    res["documents"], res["tokens"] = count_tokens(out)
    res["prefix"] = out
    return res


def same_bytes(a: str, b: str) -> bool:
    if Path(a).stat().st_size != Path(b).stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 24), fb.read(1 << 24)
            if x != y:
                return False
            if not x:
                return True


def corpus_stats(path: Path) -> dict:
    docs, size, distinct = 0, 0, Counter()
    with open(path, "rb") as f:
        for line in f:
            docs += 1
            size += len(line)
            distinct.update(re.findall(r"[A-Za-z]+", json.loads(line)["text"]))
    return {"documents": docs, "bytes": size, "distinct_words": len(distinct)}


def markdown(results: dict) -> str:
    rows = [
        "| tool | wall s | tokens/s (wall) | CPU s | tokens per CPU s | peak RSS, all processes (MB) "
        "| peak RSS, one process (MB) | load before |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("llmtrain", "megatron"):
        for r in results.get(name, []):
            rows.append(
                f"| {name} | {r['wall_s']:.2f} | {r['tokens'] / r['wall_s'] / 1e6:.2f}M | {r['cpu_s']:.1f} | "
                f"{r['tokens'] / r['cpu_s'] / 1e6:.2f}M | {r['peak_tree_rss_mb']:.0f} | "
                f"{r['max_process_rss_mb'] or '-'} | {r['load_before']} |"
            )
    r0 = results["llmtrain"][0]
    lines = [
        f"input: {results['input']} ({results['input_mb']:.1f} MB, {r0['documents']:,} documents, "
        f"{r0['tokens']:,} tokens), workers={results['workers']}, cores={results['cores']}",
        "",
        *rows,
    ]
    if "speedup" in results:
        lines += [
            "",
            f"speedup, best wall time (Megatron / llmtrain): {results['speedup']:.2f}x; "
            f"CPU time: {results['cpu_ratio']:.2f}x; .bin identical: {results['bin_identical']}; "
            f".idx identical: {results['idx_identical']}",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/llmtrain-bench-prepare"))
    p.add_argument("--input", type=Path, help="a jsonl with a 'text' field (default: generate one)")
    p.add_argument("--tokenizer", type=Path, help="a directory with tokenizer.json (default: train one)")
    p.add_argument("--megatron-lm", type=Path, help="a Megatron-LM checkout (tools/preprocess_data.py)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="timed runs of each tool (the best counts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs", type=int, default=28_500, help="documents in the generated corpus")
    p.add_argument("--vocab", type=int, default=21_000, help="vocabulary of the trained tokenizer")
    p.add_argument("--ours-extra", nargs="*", default=[], help="extra prepare overrides, e.g. fast=false")
    args = p.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)

    inp = args.input or work / f"prose-seed{args.seed}-{args.docs}.jsonl"
    if not inp.exists():
        print(f"writing {inp} ...", flush=True)
        make_corpus(inp, args.seed, args.docs)
    tok = args.tokenizer or work / f"tok-{inp.stem}-{args.vocab}"
    if not (tok / "tokenizer.json").exists():
        print(f"training a {args.vocab}-token BPE into {tok} ...", flush=True)
        train_tokenizer(inp, tok, args.vocab)

    results: dict = {"input": str(inp), "input_mb": inp.stat().st_size / 1e6, "tokenizer": str(tok)}
    results.update(workers=args.workers, cores=os.cpu_count(), llmtrain=[], megatron=[])
    if not args.input:
        results["corpus"] = corpus_stats(inp)
    for i in range(args.repeat):
        print(f"run {i + 1}/{args.repeat}: llmtrain.data.prepare ...", flush=True)
        results["llmtrain"].append(run_ours(inp, tok, work / "ours", args.workers, args.ours_extra))
        if args.megatron_lm:
            print(f"run {i + 1}/{args.repeat}: Megatron-LM tools/preprocess_data.py ...", flush=True)
            results["megatron"].append(
                run_megatron(args.megatron_lm, inp, tok, work / "megatron", args.workers)
            )
    if args.megatron_lm:
        meg = results["megatron"][-1]["prefix"]
        results["bin_identical"] = same_bytes(f"{work}/ours.bin", meg + ".bin")
        results["idx_identical"] = same_bytes(f"{work}/ours.idx", meg + ".idx")
        best = {k: min(r["wall_s"] for r in results[k]) for k in ("llmtrain", "megatron")}
        results["speedup"] = round(best["megatron"] / best["llmtrain"], 3)
        cpu = {k: min(r["cpu_s"] for r in results[k]) for k in ("llmtrain", "megatron")}
        results["cpu_ratio"] = round(cpu["megatron"] / cpu["llmtrain"], 3)
    (work / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (work / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
