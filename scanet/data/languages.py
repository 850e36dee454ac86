"""Text in any language: a tokenizer per language, and word vectors trained on the corpus itself.

    tokenizer_for("en")            English as for Wiki: lowercase letter runs, stop words and 1-letter tokens out
    tokenizer_for("zh")            Chinese: jieba segmentation (pip install jieba), then punctuation, digits,
                                   single characters and a short list of function words out
    tokenizer_for("whitespace")    any language already segmented by spaces (or a tag list): lowercase split
    train_word2vec(docs)           gensim word2vec (pip install gensim) on the tokenized training texts, seeded,
                                   one worker thread: the same corpus gives the same vectors, as a WordVectors

Word vectors for the word graph are looked up by ``embeddings_for(language, spec, train_docs)``: "word2vec"
trains on the corpus (the default where no pretrained vectors fit the language: GloVe 6B is English only),
"glove-6b-50d" or a vector-file path load pretrained ones.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from scanet.data.embeddings import GLOVE_50D, WordVectors, load_word_vectors
from scanet.data.text import english_tokenizer

LANGUAGES = ("en", "zh", "whitespace")

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
_LATIN_WORD = re.compile(r"^[a-z][a-z0-9]*(?:[-.'][a-z0-9]+)*$")
_HAS_LETTER = re.compile(r"[^\W\d_]")

# Multi-character Chinese function words (pronouns, conjunctions, auxiliaries, time deictics) that carry no
# topic; single characters (的, 了, 在, 是, ...) are dropped by length already. Deliberately short: the vocabulary
# keeps the most frequent remaining words, and news boilerplate (记者, 新华社) is left to the data.
CHINESE_FUNCTION_WORDS = frozenset(
    """
我们 你们 他们 她们 它们 咱们 自己 大家 这个 那个 这些 那些 这样 那样 这种 那种 这里 那里 这儿 那儿 这么 那么
一个 一些 一种 一样 一直 一定 一起 一方面 没有 不是 就是 还是 但是 可是 而且 并且 或者 以及 因为 所以 因此 如果
虽然 然而 然后 而是 只是 不过 于是 即使 尽管 除了 其中 其他 其它 另外 此外 同时 通过 对于 关于 根据 由于 为了
按照 随着 已经 曾经 正在 将要 可以 可能 能够 应该 需要 必须 进行 表示 认为 指出 目前 现在 当时 以后 以前 之后
之前 之间 之一 以上 以下 以来 等等 什么 怎么 怎样 如何 为什么 哪些 多少 非常 十分 更加 比较 特别 进一步 不断
还有 也是 都是 不会 不能 只有 所有 任何 每个 各种 有关 相关
""".split()
)


def _jieba_tokenizer():
    try:
        import jieba
    except ImportError as e:
        raise ImportError("Chinese text needs the jieba segmenter: pip install jieba") from e
    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading chatter goes to stderr otherwise
    return jieba.Tokenizer()  # its own instance: the default dictionary, no global state


def chinese_tokenizer(
    stopwords: Iterable[str] = CHINESE_FUNCTION_WORDS, min_cjk_chars: int = 2
) -> Callable[[str], list[str]]:
    """jieba segmentation (precise mode, HMM for unknown words) of NFKC-normalized text, keeping

    * words with at least ``min_cjk_chars`` CJK characters (single characters are mostly function words,
      measure words or fragments), and
    * Latin-script words of two or more characters, lowercased (GDP, 5G, NBA), digits allowed inside;

    dropping punctuation, numbers (10, 2019年 splits into 2019 and 年), symbols, spaces and ``stopwords``.
    """
    stop = frozenset(stopwords)
    tk = _jieba_tokenizer()

    def tokenize(text: str) -> list[str]:
        out = []
        for w in tk.lcut(unicodedata.normalize("NFKC", text)):
            w = w.strip().lower()
            if not w or w in stop:
                continue
            n_cjk = len(_CJK.findall(w))
            if n_cjk:
                if n_cjk >= min_cjk_chars and n_cjk == len(w):
                    out.append(w)
            elif len(w) >= 2 and _LATIN_WORD.match(w):
                out.append(w)
        return out

    return tokenize


def whitespace_tokenizer(stopwords: Iterable[str] = ()) -> Callable[[str], list[str]]:
    """Lowercased whitespace-separated tokens that contain a letter (any script), minus ``stopwords``."""
    stop = frozenset(stopwords)

    def tokenize(text: str) -> list[str]:
        return [
            w for w in unicodedata.normalize("NFKC", text).lower().split() if w not in stop and _HAS_LETTER.search(w)
        ]

    return tokenize


def tokenizer_for(language: str, stopwords: Iterable[str] | None = None) -> Callable[[str], list[str]]:
    if language == "en":
        return english_tokenizer(stopwords or ())
    if language == "zh":
        return chinese_tokenizer(CHINESE_FUNCTION_WORDS if stopwords is None else stopwords)
    if language == "whitespace":
        return whitespace_tokenizer(stopwords or ())
    raise ValueError(
        f"unknown language {language!r}; known: {', '.join(LANGUAGES)} "
        "(use 'whitespace' for text already split into words)"
    )


def tokenizer_version(language: str) -> str:
    """Changes whenever a tokenizer's output would change (it keys the prepared-data cache)."""
    return {"en": "english-v1", "zh": "jieba-0.42-v1", "whitespace": "whitespace-v1"}[language]


def train_word2vec(
    docs: Sequence[Sequence[str]],
    dim: int = 100,
    window: int = 5,
    min_count: int = 2,
    epochs: int = 20,
    seed: int = 0,
    skip_gram: bool = True,
) -> WordVectors:
    """Word2vec on tokenized documents (gensim): deterministic for a given corpus and seed (one worker thread;
    gensim 4 draws its initial vectors from the seed, not from Python's salted string hash).

    Skip-gram by default: it does better than CBOW on small corpora (a few hundred thousand tokens).
    """
    try:
        from gensim.models import Word2Vec
    except ImportError as e:
        raise ImportError("training word vectors on the corpus needs gensim: pip install gensim") from e
    sentences = [list(d) for d in docs if len(d)]
    if not sentences:
        raise ValueError("cannot train word2vec: every document is empty after tokenization")
    model = Word2Vec(
        sentences=sentences,
        vector_size=dim,
        window=window,
        min_count=min_count,
        sg=int(skip_gram),
        epochs=epochs,
        seed=seed,
        workers=1,
    )
    kv = model.wv
    if len(kv.index_to_key) == 0:
        raise ValueError(f"word2vec kept no word: none occurs {min_count} times or more")
    return WordVectors(
        list(kv.index_to_key),
        np.asarray(kv.vectors, np.float32),
        f"word2vec(corpus, {'sg' if skip_gram else 'cbow'}, dim={dim}, window={window}, "
        f"min_count={min_count}, epochs={epochs}, seed={seed})",
    )


def check_word2vec_options(dataset: str, **options) -> dict:
    """A preparer's ``w2v_*`` options checked (ValueError naming the option) and turned into train_word2vec's
    keywords: counts (w2v_dim, w2v_window, w2v_epochs, w2v_min_count) positive integers, w2v_sg a bool."""
    out: dict[str, int | bool] = {}
    for key, v in options.items():
        if key == "w2v_sg":
            if v not in (True, False):
                raise ValueError(f"{dataset} option w2v_sg must be True (skip-gram) or False (CBOW), got {v!r}")
            out["skip_gram"] = bool(v)
        elif isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{dataset} option {key} must be a positive integer, got {v!r}")
        else:
            out[key.removeprefix("w2v_")] = v
    return out


def embeddings_for(
    language: str, spec: str | Path, train_docs: Sequence[Sequence[str]], log: Callable[[str], None] = print, **w2v
) -> WordVectors:
    """The word vectors for a vocabulary: ``spec`` "word2vec" trains on ``train_docs``; "glove-6b-50d" or a
    path loads pretrained vectors. GloVe 6B holds English words only, so for another language it is replaced by
    word2vec with a message (the command line's default is GloVe)."""
    spec = str(spec)
    if spec == GLOVE_50D and language not in ("en", "whitespace"):
        log(f"GloVe 6B has English words only; the texts are {language!r}: training word2vec on the corpus")
        spec = "word2vec"
    if spec == "word2vec":
        log(f"training word2vec on {len(train_docs)} training texts ({sum(len(d) for d in train_docs)} tokens)")
        return train_word2vec(train_docs, **w2v)
    return load_word_vectors(spec)


def effective_embeddings(language: str, spec: str | Path) -> str:
    """What ``embeddings_for`` will use (for cache keys)."""
    spec = str(spec)
    return "word2vec" if spec == GLOVE_50D and language not in ("en", "whitespace") else spec
