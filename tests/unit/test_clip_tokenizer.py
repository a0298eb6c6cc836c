"""The torch-free CLIP tokenizer: the same ids as open_clip's SimpleTokenizer, refusals, a bounded
cache, and no torch/open_clip import on the preprocess path."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from inferline.common.errors import ConfigError, InvalidInput
from inferline.services.preprocess import clip_recipes
from inferline.services.preprocess import clip_tokenizer as module
from inferline.services.preprocess.clip_recipes import clip_tokenize
from inferline.services.preprocess.clip_tokenizer import ClipTokenizer, default_vocab_path

REPO = Path(__file__).resolve().parents[2]

TEXTS = [
    "a photo of a dog",
    "A Photo Of A DOG!!!",
    "Hello, world... what's up? I'm fine; we'll see, you'd've, they're, it's, don't",
    "numbers 0 1 12 123456789 3.14159 1,000,000 2nd 1st",
    "punctuation: !@#$%^&*()_+-=[]{}|;':\",./<>?`~ \\",
    "café naïve façade résumé Ångström",
    "日本語のテキスト 中文文本 한국어",
    "emoji 🐶🐱 👨‍👩‍👧 🏳️‍🌈 ❤️",
    "&amp;lt;b&amp;gt; bold &lt;/b&gt; &quot;quoted&quot; &#39;x&#39; &nbsp;",
    "mojibake: cafÃ© â€œquotesâ€\x9d donâ€™t",
    "  lots   of\t\twhite\n\n space \u3000 here  ",
    "supercalifragilisticexpialidocious" * 3,
    "x" * 200,
    "<start_of_text> inside <end_of_text> and <START_OF_TEXT>",
    "tab\tnew\nline\r\nzero\u200bwidth",
    "Ελληνικά Русский العربية עברית हिन्दी",
    "a-b_c.d/e\\f:g",
]

ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    "     \t\n.,;:!?'\"()[]{}<>/\\-_+=*&#%@$^~`|"
    "éèüößçñÅøæœ日本語中文한국ÃâÂ€™🐶❤️\u200b\u3000"
)


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    open_clip = pytest.importorskip("open_clip")
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def ours():
    return ClipTokenizer(default_vocab_path())


def _same_as_open_clip(ours, theirs, text):
    assert ours.encode(text) == theirs.encode(text), repr(text)
    expected = theirs([text])[0].numpy()
    if len(theirs.encode(text)) + 2 <= 77:
        got = ours.tokenize(text)
        assert got.dtype == np.int64 and got.shape == (77,)
        np.testing.assert_array_equal(got, expected, err_msg=repr(text))


def test_vocabulary_matches(ours, open_clip_tokenizer):
    assert ours.encoder == open_clip_tokenizer.encoder
    assert ours.sot_token_id == open_clip_tokenizer.sot_token_id == 49406
    assert ours.eot_token_id == open_clip_tokenizer.eot_token_id == 49407
    assert ours.vocab_size == 49408


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_open_clip(ours, open_clip_tokenizer, text):
    _same_as_open_clip(ours, open_clip_tokenizer, text)


def test_random_texts_equal_open_clip(ours, open_clip_tokenizer):
    rng = random.Random(1234)
    for _ in range(300):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 60)))
        assert ours.encode(text) == open_clip_tokenizer.encode(text), repr(text)


def test_text_that_exactly_fits(ours, open_clip_tokenizer):
    fits = " ".join(["dog"] * 75)
    assert len(ours.encode(fits)) == 75
    tokens = ours.tokenize(fits)
    np.testing.assert_array_equal(tokens, open_clip_tokenizer([fits])[0].numpy())
    assert tokens[-1] == ours.eot_token_id
    with pytest.raises(InvalidInput, match="text is 78 tokens, the model takes at most 77; shorten it"):
        ours.tokenize(fits + " dog")


def test_other_context_length(ours, open_clip_tokenizer):
    text = "a photo of a cat"
    np.testing.assert_array_equal(ours.tokenize(text, 16), open_clip_tokenizer([text], context_length=16)[0].numpy())
    with pytest.raises(InvalidInput, match="text is 7 tokens, the model takes at most 6"):
        ours.tokenize(text, 6)


@pytest.mark.parametrize("text", ["", " ", "\n\t \r\n", "\u3000"])
def test_empty_text_refused(ours, text):
    with pytest.raises(InvalidInput, match="empty"):
        ours.tokenize(text)


def test_text_without_tokens_refused(ours):
    with pytest.raises(InvalidInput, match="no tokens"):
        ours.tokenize("\x07\ufeff&nbsp;")


def test_cache_is_bounded():
    small = ClipTokenizer(default_vocab_path(), cache_size=32)
    for i in range(500):
        small.encode(f"word{i}x unique{i}y")
    info = small.cache_info()
    assert info.maxsize == 32 and info.currsize <= 32
    assert small.encode("a photo of a dog") == [320, 1125, 539, 320, 1929]


def test_bad_vocab_file(tmp_path):
    bad = tmp_path / "vocab.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(ConfigError, match="cannot read"):
        ClipTokenizer(bad)


def test_default_vocab_path_without_open_clip(monkeypatch):
    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="install open_clip_torch.*'vocab' param"):
        default_vocab_path()


def test_recipe_vocab_param(open_clip_tokenizer):
    text = "a photo of a dog"
    got = clip_tokenize(text, {"vocab": str(default_vocab_path())})
    np.testing.assert_array_equal(got, open_clip_tokenizer([text])[0].numpy())
    with pytest.raises(InvalidInput, match="vocab"):
        clip_tokenize(text, {"vocab": 3})


def test_tokenizing_needs_no_torch():
    code = (
        "import sys\n"
        "from inferline.services.preprocess import clip_recipes\n"
        "tokens = clip_recipes.clip_tokenize('a photo of a dog', {})\n"
        "assert list(tokens[:7]) == [49406, 320, 1125, 539, 320, 1929, 49407], tokens\n"
        "heavy = sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_concurrent_first_calls_build_one_tokenizer(monkeypatch):
    """The texts of one request are tokenized in parallel: they must share one build."""
    built = []
    real = ClipTokenizer

    def counting(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "ClipTokenizer", counting)
    clip_recipes._cached_tokenizer.cache_clear()
    start = threading.Barrier(8)

    def work():
        start.wait()
        clip_recipes.clip_tokenize("a photo of a dog", {})

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    clip_recipes._cached_tokenizer.cache_clear()
    assert len(built) == 1
