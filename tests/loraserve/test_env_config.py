"""Config objects from flags and environment (`loraserve.env_config`): one builder for every type."""

import argparse
from dataclasses import dataclass

import pytest

from loraserve.env_config import add_config_flags, config_from, require


@dataclass(frozen=True)
class Example:
    # an int
    count: int = 1
    # a float
    ratio: float = 0.5
    # a bool
    enabled: bool = False
    # a str
    name: str = "x"
    # a tuple
    items: tuple[str, ...] = ()
    # an optional float
    ttl: float | None = None
    # an optional int
    limit: int | None = None
    # repeated directories
    roots: tuple[str, ...] = ()

    def __post_init__(self):
        require(self.count >= 0, "count", self.count, "must be >= 0")


def parse(argv, environ):
    parser = argparse.ArgumentParser()
    add_config_flags(parser, Example, "EX_", "example", {"roots": "--root"})
    return config_from(Example, parser.parse_args(argv), "EX_", environ)


def test_every_type_parses_from_flags():
    argv = "--count 3 --ratio 0.25 --enabled yes --name n --items a,b --ttl 1.5 --limit 7 --root /a --root /b"
    assert parse(argv.split(), {}) == Example(3, 0.25, True, "n", ("a", "b"), 1.5, 7, ("/a", "/b"))


def test_every_type_parses_from_the_environment():
    environ = {
        "EX_COUNT": "3",
        "EX_RATIO": "0.25",
        "EX_ENABLED": "true",
        "EX_NAME": "n",
        "EX_ITEMS": "a b",
        "EX_TTL": "1.5",
        "EX_LIMIT": "7",
        "EX_ROOTS": "/a,/b",
    }
    assert parse([], environ) == Example(3, 0.25, True, "n", ("a", "b"), 1.5, 7, ("/a", "/b"))


def test_flag_beats_environment_beats_default():
    assert parse(["--count", "4"], {"EX_COUNT": "5", "EX_RATIO": "2"}) == Example(count=4, ratio=2.0)
    assert parse([], {"EX_ENABLED": "0"}) == Example()


def test_a_bad_value_names_the_field():
    with pytest.raises(ValueError, match=r"count \(-1\) must be >= 0"):
        parse(["--count", "-1"], {})
