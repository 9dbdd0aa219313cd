"""A fingerprint depends only on what determines the output; the registry; diffs in words."""

from __future__ import annotations

import abc
import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import stability_objects as so
import torch

import cachedata
from cachedata import fingerprint, register_fingerprint
from cachedata.fingerprint import diff_trees, fingerprint_tree

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def _run_fresh(seed: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}
    proc = subprocess.run(
        [sys.executable, str(TESTS / "stability_objects.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.timeout(600)
def test_pickle_copy_isinstance_and_use_never_move_a_fingerprint() -> None:
    """Plain, dataclass (frozen, slotted), __slots__, ABC, Protocol, functools caches,
    nn.Module after forward, torchvision v1/v2 after use, tokenizers after encode_batch:
    the same fingerprint before and after pickling (every protocol), copy, deepcopy,
    isinstance checks and use; in a fresh process under two hash seeds; and here."""
    runs = [_run_fresh(seed) for seed in ("0", "4242")]
    for run in runs:
        for name, before in run["before"].items():
            assert run["after"][name] == before, f"{name}: changed by pickling/copying/isinstance/use"
            assert run["copies"][name] == [before], f"{name}: a pickled or copied object differs"
    assert runs[0]["before"] == runs[1]["before"], "fingerprints depend on PYTHONHASHSEED"
    # This process has pickled and used these classes many times over (see disturb()).
    objs = so.build()
    so.disturb(objs)
    so.use(objs)
    assert so.fingerprints(objs) == runs[0]["before"]


def test_class_level_caches_are_not_state() -> None:
    @dataclasses.dataclass
    class Resize:
        size: int = 224

        def __call__(self, x: Any) -> Any:
            return x

    before = fingerprint(Resize())
    copy.copy(Resize())  # writes Resize.__slotnames__, as pickling does
    assert "__slotnames__" in vars(Resize)
    assert fingerprint(Resize()) == before

    class Base(abc.ABC):
        @abc.abstractmethod
        def __call__(self, x: Any) -> Any: ...

    class Impl(Base):
        def __call__(self, x: Any) -> Any:
            return x

    before = fingerprint(Impl())
    isinstance(Impl(), Base), issubclass(int, Base), isinstance(3, Base)  # fill the ABC caches
    assert fingerprint(Impl()) == before


def test_cached_property_and_lru_cache_contents_are_not_state() -> None:
    obj = so.Cached(3.0)
    before = fingerprint(obj)
    obj(torch.ones(2))  # fills the cached_property value and the lru_cache
    assert "double" in vars(obj)
    assert fingerprint(obj) == before
    assert fingerprint(so.Cached(4.0)) != before  # real state still counts


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="user code is hashed by its bytecode")
def test_existing_fingerprint_values_are_unchanged() -> None:
    """Existing namespaces survive the restructuring: values computed by the code before it."""
    assert fingerprint({"size": 224, "mean": [0.5, 0.5]}) == (
        "aa778110b057285262aea376fe530b19ad69da3eab83739690eaa6d839faa4d9"
    )
    assert fingerprint(so.Plain(5.0)) == "a5cb10f523fb2d88014c091bf718f95d8ecbdcb59c601741735ca01388a4ed4b"
    assert fingerprint(so.Slots()) == "fdfc16f34642a1f6bf8a1a547b8cd28039ef851f5324242ce54b598014cdf2da"
    assert fingerprint(so.Scale()) == "a0572539eede3bc2447a7acfb9fd6a7a042c2fccc9520af2bf10bfcbefa901f8"


# ------------------------------------------------------------------------- registry


class Opaque:
    """A type we 'do not own': its only attribute is a lock, so it cannot be walked."""

    def __init__(self, level: int) -> None:
        import threading

        self.level = level
        self._lock = threading.Lock()


class OpaqueChild(Opaque):
    pass


def test_register_fingerprint_stands_in_for_the_object() -> None:
    assert "register_fingerprint" in cachedata.__all__
    with pytest.raises(TypeError, match=r"_thread\.lock"):
        fingerprint(Opaque(1))
    register_fingerprint(Opaque, lambda o: {"level": o.level})
    assert fingerprint(Opaque(1)) == fingerprint(Opaque(1))
    assert fingerprint(Opaque(1)) != fingerprint(Opaque(2))
    assert fingerprint({"t": Opaque(3)}) == fingerprint({"t": Opaque(3)})
    # Subclasses too, with their class in the fingerprint.
    assert fingerprint(OpaqueChild(1)) != fingerprint(Opaque(1))
    # The stand-in's entries describe the object in the tree and in diffs.
    old = fingerprint_tree({"t": Opaque(1)}, root="transform").entries
    new = fingerprint_tree({"t": Opaque(2)}, root="transform").entries
    assert diff_trees(old, new) == ["transform['t']['level']: 1 -> 2"]
    # A later registration replaces the earlier one.
    register_fingerprint(Opaque, lambda o: o.level * 0)
    assert fingerprint(Opaque(1)) == fingerprint(Opaque(2))


def test_register_fingerprint_errors_name_value_and_fix() -> None:
    with pytest.raises(TypeError, match="must be a class, got int 3"):
        register_fingerprint(3, repr)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="register a subclass"):
        register_fingerprint(dict, repr)
    with pytest.raises(TypeError, match="fn must be callable"):
        register_fingerprint(Opaque, "level")  # type: ignore[arg-type]

    class Selfish:
        pass

    register_fingerprint(Selfish, lambda o: o)
    with pytest.raises(TypeError, match=r"returned the object itself at obj\['x'\]"):
        fingerprint({"x": Selfish()})


def test_register_fingerprint_wins_over_a_shipped_library_handler(tmp_path: Path) -> None:
    """Registered before the library was ever walked, a user's choice stays in force."""
    script = (
        "import cachedata, tokenizers\n"
        "from tokenizers import Tokenizer, models\n"
        "cachedata.register_fingerprint(Tokenizer, lambda t: t.get_vocab_size())\n"
        "a = Tokenizer(models.WordLevel({'a': 0, 'b': 1}, unk_token='a'))\n"
        "b = Tokenizer(models.WordLevel({'x': 0, 'y': 1}, unk_token='x'))\n"
        "print(cachedata.fingerprint(a) == cachedata.fingerprint(b))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


# ------------------------------------------------------------------- diffs in words


def test_tokenizer_vocabulary_change_is_said_in_words() -> None:
    from cachedata.transforms import Tokenize

    old = fingerprint_tree(Tokenize(so.tokenizer(60)), root="transform").entries
    new = fingerprint_tree(Tokenize(so.tokenizer(70)), root="transform").entries
    lines = diff_trees(old, new)
    vocab = [line for line in lines if line.startswith("transform._tokenizer.vocabulary:")]
    assert vocab == ["transform._tokenizer.vocabulary: changed (60 -> 70 tokens)"], lines
    assert not any("#" in line for line in lines), lines  # words, not hashes


def test_model_change_is_said_in_words() -> None:
    a, b = so.Net(), so.Net()
    with torch.no_grad():
        b.head.weight.add_(1)
    lines = diff_trees(fingerprint_tree(a, root="model").entries, fingerprint_tree(b, root="model").entries)
    assert lines == ["model.head.weight: changed (tensor(shape=[2, 8], dtype=torch.float32))"]
    # Deeper than the tree keeps: the module is summarized by its parameters.
    shallow = fingerprint_tree({"m": a}, root="t", max_depth=2).entries
    assert shallow["t['m'].head"].startswith("Linear: 18 parameters in 2 tensors #")
    wider = torch.nn.Linear(8, 3)
    lines = diff_trees(
        shallow, fingerprint_tree({"m": torch.nn.Sequential(a.body, wider)}, root="t", max_depth=1).entries
    )
    assert lines and not any(line.endswith("#") for line in lines)


def test_describe_change_wording() -> None:
    from cachedata.fingerprint import describe_change

    assert describe_change("224", "256") == "224 -> 256"
    assert describe_change("30,522 tokens #0123456789abcdef", "30,519 tokens #fedcba9876543210") == (
        "changed (30,522 -> 30,519 tokens)"
    )
    assert describe_change(
        "tensor(shape=[3], dtype=x) #0123456789abcdef", "tensor(shape=[3], dtype=x) #0123456789abcdee"
    ) == ("changed (tensor(shape=[3], dtype=x))")
